"""Median prefill wall time per method after a warm-up pass (which absorbs compilation), its
speed-up over dense, and compile time apart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from matplotlib.figure import Figure
from omegaconf import MISSING

import flex_pbs
from flex_pbs.runner.checks import positive_int
from flex_pbs.runner.measure import stats_summary, timed_forward
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.session import Session, attention, evaluation_ids
from flex_pbs.runner.tasks.common import (
    Method,
    compared_methods,
    grouped_bars,
    method_fields,
    progress,
    random_weights_notes,
)

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec


@dataclass
class LatencyTask:
    """Prefill wall time per method after a warm-up pass (compile time reported apart)."""

    name: str = MISSING
    repeats: int = MISSING


def check(task: LatencyTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    positive_int("task.repeats", task.repeats)


def latency_of(method: Method, spec: RunSpec, session: Session, ids: torch.Tensor) -> dict[str, Any]:
    """Warm-up pass (with stats, for density), then ``repeats`` timed prefill passes."""
    sparse = method.engine is not None
    with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds, collect_stats=sparse):
        warmup_s = timed_forward(session, ids, logits_to_keep=1)[1]
        density = stats_summary(flex_pbs.stats(session.model))["density"] if sparse else 1.0
    with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds):
        times = [
            timed_forward(session, ids, logits_to_keep=1)[1]
            for _ in progress(range(spec.task.repeats), desc=f"prefill {method.name}", unit="pass", leave=False)
        ]
    median = statistics.median(times)
    return {
        **method_fields(method),
        "seq_len": spec.seq_len,
        "prefill_s": median,
        "min_s": min(times),
        "warmup_s": warmup_s,
        "compile_s": max(0.0, warmup_s - median),
        "density": density,
        "times_s": times,
    }


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    """Median prefill time per method, and mean density."""
    labels = [r["method"] for r in rows]
    fig = Figure(figsize=(8, 4), layout="constrained")
    time_ax, density_ax = fig.subplots(1, 2)
    grouped_bars(time_ax, labels, {"prefill": [r["prefill_s"] for r in rows]}, "prefill wall time (s, median)",
                  f"prefill, {rows[0]['seq_len']} tokens")
    grouped_bars(density_ax, labels, {"density": [r["density"] for r in rows]},
                  "mean density (computed / causal blocks)", "density")
    density_ax.set_ylim(0, 1.1)
    fig.savefig(path, dpi=120)


def latency_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Median prefill wall time per method, its speed-up over dense, and compile time apart."""
    ids = evaluation_ids(spec, session)
    rows = [latency_of(m, spec, session, ids) for m in progress(compared_methods(spec), desc="methods", unit="method")]
    for row in rows:
        row["speedup"] = rows[0]["prefill_s"] / row["prefill_s"]
    columns = [
        Column("method", "method"),
        Column("seq_len", "context"),
        Column("prefill_s", f"prefill (s, median of {spec.task.repeats})", "{:.3f}"),
        Column("min_s", "min (s)", "{:.3f}"),
        Column("speedup", "speed-up vs dense", "{:.2f}x"),
        Column("compile_s", "compile (s, est.)", "{:.1f}"),
        Column("density", "mean density", "{:.3f}"),
    ]
    notes = random_weights_notes(session, spec) + [
        "prefill: one forward pass without KV cache, logits of the last token only; "
        "compile = warm-up pass time - median (the warm-up absorbs FlexAttention compilation)",
    ]
    result = TaskResult("latency", rows, columns, {}, notes)
    return result, partial(plot_latency, rows)
