"""Combine the ``sweep.csv`` of several ``flex-pbs-sweep`` summaries into one table and plot.

A method's threshold points may come from several sweeps (a first sweep, then more thresholds
to reach a density), and a README comparison draws lines of several sweeps together. This
reads the CSVs, keeps one dense row per (text, length), optionally renames lines (a sweep
labels a line by what varied *in that sweep*, e.g. ``pbs``) and keeps only some, and writes
``sweep.csv``, ``sweep.md`` and ``sweep.png`` as ``flex-pbs-sweep`` does, so that
``quality_at_density.py`` reads the result like any sweep.

    python benchmarks/combine_sweeps.py a/sweep.csv b/sweep.csv --rename pbs "pbs (default)" \\
        --lines "pbs (default)" xattention --out benchmarks/quality/combined --title "code 8K"
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flex_pbs.runner import plots  # noqa: E402
from flex_pbs.runner.report import format_table, write_csv  # noqa: E402
from flex_pbs.runner.sweep import sweep_columns  # noqa: E402

NUMERIC = ("seq_len", "perplexity", "tail_perplexity", "tail_tokens", "delta_pct", "tail_delta_pct", "passkey", "density", "recall")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one ``sweep.csv``, numbers parsed, with the file they came from."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        row["seq_len"] = int(row["seq_len"])
        row["run"] = f"{path.parent.name}/{row.get('run', '')}"
    return rows


def combine(
    paths: list[Path], renames: dict[str, str], keep: list[str] | None
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """``(dense rows, {line: points sorted by density})``: dense once per (text, length, tail)."""
    dense: dict[tuple, dict[str, Any]] = {}
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        for row in read_rows(path):
            if row["method"] == "dense":
                dense.setdefault((row["text"], row["seq_len"], row["tail_tokens"]), row)
                continue
            row["line"] = renames.get(row["line"], row["line"])
            lines[row["line"]].append(row)
    missing = [name for name in keep or [] if name not in lines]
    if missing:
        raise SystemExit(f"no line named {missing}; lines present: {sorted(lines)}")
    order = keep or list(lines)
    return list(dense.values()), {name: sorted(lines[name], key=lambda p: p["density"]) for name in order}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, nargs="+", help="sweep.csv files written by flex-pbs-sweep")
    parser.add_argument("--rename", nargs=2, action="append", default=[], metavar=("OLD", "NEW"),
                        help="rename a line (repeat for several; labels may contain '=')")
    parser.add_argument("--lines", nargs="+", default=None, help="keep only these lines (after renaming), in order")
    parser.add_argument("--out", type=Path, required=True, help="directory for sweep.csv, sweep.md, sweep.png")
    parser.add_argument("--title", default="combined sweeps", help="heading of sweep.md")
    args = parser.parse_args(argv)
    renames = dict(args.rename)
    dense, lines = combine(args.csv, renames, args.lines)
    rows = [{**d, "line": "dense"} for d in dense] + [p for points in lines.values() for p in points]
    tail = f"ppl last {int(dense[0]['tail_tokens'])}" if dense else "tail ppl"
    table = format_table(rows, sweep_columns(tail))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "sweep.csv", rows)
    sources = "".join(f"\n* {path}" for path in args.csv)
    (args.out / "sweep.md").write_text(f"# {args.title}\n\n{table}\n\nCombined from:{sources}\n")
    plots.plot_sweep(lines, dense, tail, args.out / "sweep.png")
    print(f"{table}\n\nwritten: {args.out / 'sweep.csv'}, {args.out / 'sweep.md'}, {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
