"""Perplexity of the whole sequence and of its last ``tail_tokens`` predictions, in one forward
pass per method with its attention in every layer; mean density and recall from flex_pbs's
stats; a few passkey trials at the same length."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from matplotlib.figure import Figure
from omegaconf import MISSING

import flex_pbs
from flex_pbs.runner.checks import non_negative_int, positive_int, require
from flex_pbs.runner.data import passkeys
from flex_pbs.runner.measure import (
    passkey_trial,
    perplexity,
    stats_summary,
    timed_forward,
    token_losses,
)
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.session import Session, attention, evaluation_ids
from flex_pbs.runner.tasks.common import (
    Method,
    compared_methods,
    grouped_bars,
    method_fields,
    progress,
    random_weights_notes,
    relative_change_pct,
)

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec


@dataclass
class PerplexityTask:
    """Perplexity of the whole sequence and of its last ``tail_tokens`` predictions, with a few
    passkey trials at the same length."""

    name: str = MISSING
    tail_tokens: int = MISSING
    recall: bool = MISSING
    passkey_trials: int = MISSING
    passkey_new_tokens: int = MISSING
    timed: bool = MISSING


def check(task: PerplexityTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    require(seq_len >= 2, f"seq_len must be >= 2 for task=perplexity (it predicts tokens 2..seq_len), got {seq_len}")
    positive_int("task.tail_tokens", task.tail_tokens)
    non_negative_int("task.passkey_trials", task.passkey_trials)
    positive_int("task.passkey_new_tokens", task.passkey_new_tokens)


def spread_passkey_trials(session: Session, length: int, count: int, new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``count`` passkey trials at ``length`` tokens, depths spread evenly over the context
    (none when ``count`` is 0)."""
    keys = passkeys(count, seed)
    depths = [(i + 0.5) / count for i in range(count)]
    return [
        passkey_trial(session, length, depth, key, new_tokens)
        for depth, key in progress(list(zip(depths, keys)), desc="passkey", unit="trial", leave=False, disable=None if count else True)
    ]


def perplexity_of(method: Method, spec: RunSpec, session: Session, ids: torch.Tensor, tail: int) -> tuple[dict, dict]:
    """One method's perplexity row and its details (per-layer stats, passkey trials)."""
    task = spec.task
    sparse = method.engine is not None
    stats = {"collect_stats": sparse, "recall": sparse and task.recall}
    first_pass_s = wall_s = None
    if task.timed:
        # A first pass warms up and, for sparse methods, compiles FlexAttention and collects the
        # stats (and recall), so that the timed pass below carries none of that.
        with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds, **stats):
            first_pass_s = timed_forward(session, ids, logits_to_keep=1)[1]
            summary = stats_summary(flex_pbs.stats(session.model)) if sparse else None
        stats = {}
    with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds, **stats):
        output, wall = timed_forward(session, ids)
        wall_s = wall if task.timed else None
        losses = token_losses(output.logits, ids)
        del output
        if not task.timed:
            summary = stats_summary(flex_pbs.stats(session.model)) if sparse else None
        trials = spread_passkey_trials(session, spec.seq_len, task.passkey_trials, task.passkey_new_tokens, spec.seed)
    correct = sum(t["correct"] for t in trials)
    row = {
        **method_fields(method),
        "seq_len": spec.seq_len,
        "perplexity": perplexity(losses),
        "tail_perplexity": perplexity(losses[-tail:]),
        "tail_tokens": tail,
        "passkey": correct / len(trials) if trials else None,
        "passkey_correct": correct if trials else None,
        "passkey_trials": len(trials),
        "density": summary["density"] if sparse else 1.0,
        "permuted_heads": summary["permuted_heads"] if sparse else 0.0,
        "recall": (summary["recall"] if sparse else 1.0) if task.recall else None,
        "wall_s": wall_s,
        "first_pass_s": first_pass_s,
    }
    return row, {"stats": summary, "passkey": trials}


_DENSE_ROWS: dict[tuple, tuple[dict, dict]] = {}


def plot_perplexity(rows: list[dict[str, Any]], tail_header: str, path: Path) -> None:
    """Per method: perplexity (full and tail), its change vs dense, and density / recall."""
    labels = [r["method"] for r in rows]
    fig = Figure(figsize=(13, 4), layout="constrained")
    ppl, delta, density = fig.subplots(1, 3)
    series = {"full sequence": "perplexity", tail_header: "tail_perplexity"}
    grouped_bars(ppl, labels, {n: [r[k] for r in rows] for n, k in series.items()}, "perplexity",
                  f"perplexity, {rows[0]['seq_len']} tokens")
    deltas = {"full sequence": "delta_pct", tail_header: "tail_delta_pct"}
    grouped_bars(delta, labels, {n: [r[k] for r in rows] for n, k in deltas.items()}, "change vs dense (%)",
                  "perplexity change vs dense")
    grouped_bars(density, labels, {"density": [r["density"] for r in rows], "recall": [r["recall"] for r in rows]},
                  "mean over layers and heads", "density (computed / causal blocks), recall")
    density.set_ylim(0, 1.15)
    fig.savefig(path, dpi=120)


def perplexity_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Perplexity, tail perplexity, passkey accuracy, density, recall and wall time per method."""
    ids = evaluation_ids(spec, session)
    tail = min(spec.task.tail_tokens, spec.seq_len - 1)
    rows, details = [], {}
    for method in progress(compared_methods(spec), desc="methods", unit="method"):
        if method.engine is None:  # dense is the same in every job of a sweep: measure it once
            key = (id(session), spec.text, spec.seq_len, tail, spec.seed, repr(spec.task))
            if key not in _DENSE_ROWS:
                _DENSE_ROWS.clear()
                _DENSE_ROWS[key] = perplexity_of(method, spec, session, ids, tail)
            row, details[method.name] = _DENSE_ROWS[key]
            row = dict(row)
        else:
            row, details[method.name] = perplexity_of(method, spec, session, ids, tail)
        rows.append(row)
    for row in rows:
        row["delta_pct"] = relative_change_pct(row["perplexity"], rows[0]["perplexity"])
        row["tail_delta_pct"] = relative_change_pct(row["tail_perplexity"], rows[0]["tail_perplexity"])
    tail_header = f"ppl last {tail}"
    columns = [
        Column("method", "method"),
        Column("seq_len", "context"),
        Column("perplexity", "perplexity", "{:.3f}"),
        Column("delta_pct", "Δ vs dense (%)", "{:+.2f}"),
        Column("tail_perplexity", tail_header, "{:.3f}"),
        Column("tail_delta_pct", f"Δ last {tail} (%)", "{:+.2f}"),
        Column("passkey", f"passkey (n={spec.task.passkey_trials})", "{:.0%}"),
        Column("density", "mean density", "{:.3f}"),
        Column("recall", "mean recall", "{:.3f}"),
        Column("wall_s", "wall (s)", "{:.2f}"),
    ]
    notes = random_weights_notes(session, spec) + [
        "wall: the forward pass that gave the losses, after a first pass over the same tokens "
        "that warms up and, for sparse methods, compiles FlexAttention and collects density and "
        "recall (first_pass_s in results.json). For prefill speed use task=latency."
        if spec.task.timed
        else "task.timed=false: one pass per method (losses and stats together), no wall time.",
    ]
    if tail < spec.task.tail_tokens:
        notes.append(f"task.tail_tokens={spec.task.tail_tokens} exceeds the {spec.seq_len - 1} predictions; used {tail}")
    result = TaskResult("perplexity", rows, columns, details, notes)
    return result, partial(plot_perplexity, rows, tail_header)
