"""What a task returns and how it is written: a printed table, ``results.json``,
``results.csv`` and ``results.png`` in the run directory."""

from __future__ import annotations

import csv
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


@dataclass(frozen=True)
class Column:
    """A printed table column: ``fmt`` formats the row's value under ``key`` (None → ``-``)."""

    key: str
    header: str
    fmt: str = "{}"


@dataclass
class TaskResult:
    """A task's output.

    Attributes:
        rows: one flat-ish dict per table row (nested dicts are flattened in the CSV).
        columns: the printed table's columns.
        details: task-specific data for ``results.json`` (per layer, per trial, ...).
        notes: caveats printed under the table and saved with the results.
    """

    task: str
    rows: list[dict[str, Any]]
    columns: list[Column]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def format_value(value: Any, fmt: str) -> str:
    """A table cell: ``-`` for missing values (None or NaN), ``fmt.format(value)`` otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: Iterable[dict[str, Any]], columns: list[Column]) -> str:
    """A Markdown pipe table, padded so that it also reads well in a terminal."""
    if not columns:
        raise ValueError("a table needs at least one column")
    cells = [[c.header for c in columns]] + [[format_value(r.get(c.key), c.fmt) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"engine": {"threshold": 0.9}}`` → ``engine.threshold``)."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV, flattened; the header is the union of keys in first-seen order, without a
    key that other rows hold as a nested dict (e.g. dense's ``engine: None``)."""
    flat = [flatten(r) for r in rows]
    keys = list(dict.fromkeys(key for r in flat for key in r))
    header = [k for k in keys if not any(other.startswith(f"{k}.") for other in keys)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (NaN and infinities written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware the numbers came from."""
    import transformers

    from flex_pbs import __version__

    return {
        "flex_pbs": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
    }


def write_results(
    out_dir: Path, payload: dict[str, Any], rows: list[dict[str, Any]], plot: Callable[[Path], None]
) -> list[Path]:
    """Write ``results.json`` (``payload``), ``results.csv`` (``rows``) and ``results.png``
    (drawn by ``plot``) into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "results.png"
    plot(png)
    return [write_json(out_dir / "results.json", payload), write_csv(out_dir / "results.csv", rows), png]
