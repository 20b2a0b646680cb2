"""Passkey retrieval accuracy per context length and needle depth (the same keys for every
method)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List

from matplotlib.figure import Figure
from omegaconf import MISSING

from flex_pbs.runner.checks import positive_int, require
from flex_pbs.runner.data import passkeys
from flex_pbs.runner.measure import passkey_trial
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.session import Session, attention
from flex_pbs.runner.tasks.common import (
    compared_methods,
    method_fields,
    progress,
    random_weights_notes,
)

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec


@dataclass
class PasskeyTask:
    """Passkey retrieval accuracy per context length and needle depth."""

    name: str = MISSING
    lengths: List[int] = MISSING
    depths: List[float] = MISSING
    trials: int = MISSING
    new_tokens: int = MISSING


def check(task: PasskeyTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    require(len(task.lengths) > 0, "task.lengths must list at least one length")
    for length in task.lengths:
        positive_int("task.lengths[]", length)
    require(len(task.depths) > 0, "task.depths must list at least one depth")
    for depth in task.depths:
        require(0.0 <= depth <= 1.0, f"task.depths[] must be in [0, 1], got {depth}")
    positive_int("task.trials", task.trials)
    positive_int("task.new_tokens", task.new_tokens)


def depth_key(depth: float) -> str:
    return f"depth_{depth:g}"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def depth_offsets(depths: list[float], series: int) -> list[float]:
    """Horizontal offsets that set ``series`` lines side by side around each depth (accuracies
    are often equal across methods, and equal lines would hide each other): about 0.015 apart,
    all of them within a quarter of the gap between neighbouring depths."""
    distinct = sorted(set(depths))
    gap = min((b - a for a, b in zip(distinct, distinct[1:])), default=1.0)
    step = min(0.015, 0.5 * gap / max(series - 1, 1))
    return [(i - (series - 1) / 2) * step for i in range(series)]


def plot_passkey(rows: list[dict[str, Any]], depth_keys: list[tuple[str, float]], path: Path) -> None:
    """Passkey accuracy against needle depth, one line per method and length, each with its
    own marker and line style and slightly beside the others, so that equal lines stay visible
    (the ticks mark the true depths)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    depths = [depth for _, depth in depth_keys]
    for i, (row, offset) in enumerate(zip(rows, depth_offsets(depths, len(rows)))):
        ax.plot(
            [depth + offset for depth in depths], [row[key] for key, _ in depth_keys],
            marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)], color=f"C{i % 10}",
            label=f"{row['method']}, {row['length']} tok",
        )
    ax.set_xticks(sorted(set(depths)))
    ax.set_xlabel("needle depth (0 = start, 1 = end)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.savefig(path, dpi=120)


def passkey_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Accuracy per method, length and depth over ``trials`` pass keys (the same keys for every
    method)."""
    task = spec.task
    cells = [(length, depth) for length in task.lengths for depth in task.depths for _ in range(task.trials)]
    keys = passkeys(len(cells), spec.seed)
    rows, details = [], {}
    for method in progress(compared_methods(spec), desc="methods", unit="method"):
        with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds):
            trials = [
                {"requested_length": length, **passkey_trial(session, length, depth, key, task.new_tokens)}
                for (length, depth), key in progress(list(zip(cells, keys)), desc="passkey", unit="trial", leave=False)
            ]
        details[method.name] = trials
        for length in task.lengths:
            at_length = [t for t in trials if t["requested_length"] == length]
            row = {**method_fields(method), "length": length}
            for depth in task.depths:
                hits = [t["correct"] for t in at_length if t["depth"] == depth]
                row[depth_key(depth)] = sum(hits) / len(hits)
            row["accuracy"] = sum(t["correct"] for t in at_length) / len(at_length)
            rows.append(row)
    depth_keys = [(depth_key(d), d) for d in task.depths]
    columns = [Column("method", "method"), Column("length", "context")]
    columns += [Column(key, f"depth {d:g}", "{:.0%}") for key, d in depth_keys]
    columns.append(Column("accuracy", f"mean (n={task.trials}/depth)", "{:.0%}"))
    notes = random_weights_notes(session, spec) + [
        f"greedy decoding of {task.new_tokens} tokens; a trial is correct when the pass key's digits appear"
    ]
    result = TaskResult("passkey", rows, columns, details, notes)
    return result, partial(plot_passkey, rows, depth_keys)
