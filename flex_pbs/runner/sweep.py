"""``flex-pbs-sweep <multirun_dir>``: summarise a perplexity sweep of ``flex-pbs-run -m``.

Every ``results.json`` under the directory (one per job) contributes its sparse-method row;
dense rows (one per job, identical for identical model, text and length) are kept once. Writes
``sweep.csv``, ``sweep.md`` and ``sweep.png`` (perplexity and tail perplexity against mean
density, one line per method across its runs, dense as a horizontal reference) and prints the
table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from flex_pbs.runner.checks import ArgumentParser, fail
from flex_pbs.runner.report import Column, format_table, write_csv

SWEPT_TASK = "perplexity"
# What the summary reads of a perplexity results.json (other fields are optional: runs made by
# other versions may lack them): key paths of the payload, keys of every row, of sparse rows.
RESULTS_KEYS = (("rows",), ("overrides",), ("config", "model", "name"), ("config", "text"))
ROW_KEYS = ("method", "seq_len", "perplexity", "tail_perplexity", "tail_tokens", "density")
SPARSE_ROW_KEYS = ("engine",)


class ResultsError(ValueError):
    """A ``results.json`` the summary cannot read; the message starts with its path."""


def find_results(root: Path) -> list[Path]:
    """Every ``results.json`` under ``root``, in path order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (pass a flex-pbs-run -m output directory)")
    return sorted(root.rglob("results.json"))


def read_results(path: Path) -> dict[str, Any]:
    """The payload of a ``results.json``; :class:`ResultsError` if it is not a JSON object."""
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path}: not valid JSON ({error}); a truncated file? rerun its job or move it away") from None
    if not isinstance(payload, dict):
        raise ResultsError(f"{path}: not a JSON object, not a flex-pbs-run results file")
    return payload


def missing_key(payload: dict[str, Any]) -> str | None:
    """The first key that a perplexity results payload lacks and the summary reads, as a
    message (``missing key 'config.model'``), or None."""
    for keys in RESULTS_KEYS:
        node: Any = payload
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                return f"missing key {'.'.join(keys[: depth + 1])!r}"
            node = node[key]
    if not isinstance(payload["rows"], list) or not all(isinstance(row, dict) for row in payload["rows"]):
        return "'rows' is not a list of rows"
    for i, row in enumerate(payload["rows"]):
        sparse = row.get("method") != "dense"
        for key in ROW_KEYS + (SPARSE_ROW_KEYS if sparse else ()):
            if key not in row:
                return f"rows[{i}] (method {row.get('method')}) has no key {key!r}"
        if sparse and not isinstance(row["engine"], dict):
            return f"rows[{i}] (method {row.get('method')}): 'engine' is not a mapping"
    return None


def load_runs(paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """``(perplexity results, skipped)``: results of other tasks are listed as skipped; a file
    that is not JSON or lacks a key the summary reads raises :class:`ResultsError`."""
    runs, skipped = [], []
    for path in paths:
        payload = read_results(path)
        if payload.get("task") != SWEPT_TASK:
            skipped.append(f"{path} (task={payload.get('task')})")
            continue
        problem = missing_key(payload)
        if problem:
            raise ResultsError(f"{path}: {problem} (a perplexity results.json of flex-pbs-run)")
        runs.append({**payload, "path": path})
    return runs, skipped


def _run_fields(run: dict[str, Any], row: dict[str, Any], root: Path) -> dict[str, Any]:
    keep = ("method", "threshold", "engine", "seq_len", "perplexity", "tail_perplexity", "tail_tokens",
            "delta_pct", "tail_delta_pct", "passkey", "density", "recall", "wall_s")
    return {
        **{key: row.get(key) for key in keep},
        "model": run["config"]["model"]["name"],
        "text": run["config"]["text"],
        "layer_thresholds": run["config"].get("layer_thresholds"),
        "run": str(run["path"].parent.relative_to(root)),
        "overrides": " ".join(run["overrides"]),
    }


def sweep_rows(runs: list[dict[str, Any]], root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(dense rows, method rows)``: dense once per (model, text, length, tail), then every
    sparse row."""
    dense, methods = {}, []
    for run in runs:
        for row in run["rows"]:
            fields = _run_fields(run, row, root)
            if row["method"] == "dense":
                dense.setdefault((fields["model"], fields["text"], fields["seq_len"], fields["tail_tokens"]), fields)
            else:
                methods.append(fields)
    return list(dense.values()), methods


def varying_engine_fields(rows: list[dict[str, Any]]) -> list[str]:
    """Engine fields whose value differs between rows (``threshold`` if none does)."""
    engines = [r["engine"] for r in rows]
    # Runs made by other versions may have other fields: compare the fields they all have.
    shared = [key for key in engines[0] if all(key in e for e in engines)]
    varying = [key for key in shared if len({repr(e[key]) for e in engines}) > 1]
    return varying or ["threshold"]


def curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Method rows grouped into lines (by method, by any engine field other than the threshold
    that varies within a method, and by length, text or model when several are present), sorted by
    density; each point gets a label of the engine fields that vary along its line."""
    several = {key: len({r.get(key) for r in rows}) > 1 for key in ("seq_len", "model", "text")}
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for method, method_rows in by_method.items():
        variants = [f for f in varying_engine_fields(method_rows) if f != "threshold"]
        calibrated = len({r.get("layer_thresholds") for r in method_rows}) > 1
        for row in method_rows:
            label = ", ".join([method, *(f"{f}={row['engine'].get(f)}" for f in variants)])
            if calibrated:
                path = row.get("layer_thresholds")
                label += f", layer_thresholds={Path(path).stem if path else None}"
            label += f", {row['seq_len']} tok" if several["seq_len"] else ""
            label += f", {row['text']}" if several["text"] else ""
            grouped[label + (f", {row['model']}" if several["model"] else "")].append(row)
    for line, points in grouped.items():
        fields = varying_engine_fields(points)
        for p in points:
            p["line"] = line
            p["point_label"] = ", ".join(f"{key}={p['engine'].get(key)}" for key in fields)
        points.sort(key=lambda p: p["density"])
    return dict(grouped)


def tail_header(rows: list[dict[str, Any]]) -> str:
    tails = {r["tail_tokens"] for r in rows}
    return f"ppl last {tails.pop()}" if len(tails) == 1 else "tail ppl"


def sweep_columns(tail: str) -> list[Column]:
    return [
        Column("line", "method"),
        Column("point_label", "setting"),
        Column("seq_len", "context"),
        Column("perplexity", "perplexity", "{:.3f}"),
        Column("delta_pct", "Δ vs dense (%)", "{:+.2f}"),
        Column("tail_perplexity", tail, "{:.3f}"),
        Column("tail_delta_pct", "Δ tail (%)", "{:+.2f}"),
        Column("passkey", "passkey", "{:.0%}"),
        Column("density", "mean density", "{:.3f}"),
        Column("recall", "mean recall", "{:.3f}"),
        Column("run", "run"),
    ]


def _varying_name(curves: dict[str, list[dict[str, Any]]]) -> str:
    """What the point labels are: the field name when every point varies the same one field."""
    labels = {p["point_label"] for points in curves.values() for p in points}
    names = {label.split("=", 1)[0] for label in labels if "," not in label and "=" in label}
    return names.pop() if len(names) == 1 else "settings"


def plot_sweep(curves: dict[str, list[dict[str, Any]]], dense: list[dict[str, Any]], tail_header: str, path: Path) -> None:
    """Perplexity (left) and tail perplexity (right) against mean density: one line per method
    across its runs, dense as a horizontal reference line per context length."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("perplexity", "tail_perplexity"), ("perplexity", tail_header)):
        for i, (label, points) in enumerate(curves.items()):
            ax.plot([p["density"] for p in points], [p[key] for p in points], marker="o", color=f"C{i}", label=label)
            for p in points:  # just the values: the legend says what varies
                value = p["point_label"].split("=", 1)[-1] if "," not in p["point_label"] else p["point_label"]
                ax.annotate(value, (p["density"], p[key]), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=f"C{i}")
        for j, row in enumerate(dense):
            ax.axhline(row[key], color="k", linestyle="--" if j == 0 else ":", linewidth=1, label=f"dense, {row['seq_len']} tok")
        ax.set_xlabel("mean density (computed / causal blocks)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs density (points: {_varying_name(curves)})")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def summarize(root: Path, out_dir: Path | None = None) -> str:
    """Write ``sweep.csv``, ``sweep.md`` and ``sweep.png`` for the sweep under ``root`` (into
    ``out_dir``, default ``root``) and return the table."""
    root = Path(root)
    out_dir = Path(out_dir or root)
    runs, skipped = load_runs(find_results(root))
    if not runs:
        raise FileNotFoundError(
            f"no {SWEPT_TASK} results.json under {root}; run e.g. "
            "`flex-pbs-run -m method=pbs,xattention method.threshold=0.8,0.9` first"
        )
    dense, methods = sweep_rows(runs, root)
    lines = curves(methods)
    rows = [{**d, "line": "dense"} for d in dense] + [p for points in lines.values() for p in points]
    tail = tail_header(rows)
    table = format_table(rows, sweep_columns(tail))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "sweep.csv", rows)
    skipped_text = "".join(f"\n* skipped {s}" for s in skipped)
    (out_dir / "sweep.md").write_text(f"# Sweep {root}\n\n{table}\n{skipped_text}\n")
    plot_sweep(lines, dense, tail, out_dir / "sweep.png")
    return table + skipped_text


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``flex-pbs-sweep``."""
    parser = ArgumentParser(prog="flex-pbs-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="the directory of a `flex-pbs-run -m` sweep")
    parser.add_argument("--out", type=Path, default=None, help="where to write sweep.* (default: multirun_dir)")
    args = parser.parse_args(argv)
    try:
        table = summarize(args.multirun_dir, args.out)
    except (OSError, ResultsError) as error:  # a missing directory or file, a broken results.json
        fail(parser.prog, error)
    out = args.out or args.multirun_dir
    print(f"{table}\n\nwritten: {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
