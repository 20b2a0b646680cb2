"""Quality of every line of ``flex-pbs-sweep`` summaries at matched densities.

A threshold sweep gives each method a few (density, perplexity) points; methods land on
different densities, so comparing rows of equal threshold compares unequal budgets. This reads
the ``sweep.csv`` of one or more sweeps, interpolates each line's Δ perplexity and Δ last-tokens
perplexity (in % of dense) linearly in density, and prints them at the asked densities
(``-`` outside a line's measured range: no extrapolation). Writes JSON next to the first CSV
unless ``--out`` says otherwise.

    python benchmarks/quality_at_density.py sweeps/code_8192/sweep.csv --densities 0.2 0.25 0.3
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def read_lines(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``{line: [(density, Δppl %, Δtail %), ...]}`` sorted by density, dense excluded."""
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["method"] != "dense":
                lines[row["line"]].append((float(row["density"]), float(row["delta_pct"]), float(row["tail_delta_pct"])))
    return {line: sorted(points) for line, points in lines.items()}


def interpolate(points: list[tuple[float, float, float]], density: float) -> tuple[float, float] | None:
    """Linear interpolation of (Δppl, Δtail) at ``density``; None outside the measured range."""
    for (d0, p0, t0), (d1, p1, t1) in zip(points, points[1:]):
        if d0 <= density <= d1 and d1 > d0:
            w = (density - d0) / (d1 - d0)
            return p0 + w * (p1 - p0), t0 + w * (t1 - t0)
    if len(points) == 1 and abs(points[0][0] - density) < 1e-9:
        return points[0][1], points[0][2]
    return None


def sweep_name(path: Path) -> str:
    """A sweep's name: its directory for ``<dir>/sweep.csv``, else the file's stem."""
    return path.parent.name if path.name == "sweep.csv" else path.stem.removesuffix("_sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, nargs="+", help="sweep.csv files written by flex-pbs-sweep")
    parser.add_argument("--densities", type=float, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for path in args.csv:
        for line, points in read_lines(path).items():
            for density in args.densities:
                value = interpolate(points, density)
                results.append({
                    "sweep": sweep_name(path), "line": line, "density": density,
                    "delta_pct": None if value is None else value[0],
                    "tail_delta_pct": None if value is None else value[1],
                })
    header = "| sweep | line | " + " | ".join(f"Δppl / Δtail @ {d:g}" for d in args.densities) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.densities)))
    by_line = defaultdict(dict)
    for r in results:
        by_line[r["sweep"], r["line"]][r["density"]] = r
    for (sweep, line), cells in by_line.items():
        text = [
            "-" if cells[d]["delta_pct"] is None else f"{cells[d]['delta_pct']:+.2f}% / {cells[d]['tail_delta_pct']:+.2f}%"
            for d in args.densities
        ]
        print(f"| {sweep} | {line} | " + " | ".join(text) + " |")
    out = args.out or args.csv[0].parent / "quality_at_density.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
