"""Perplexity of a continuation after a sparse prefill, as sparse prefill is deployed: the first
``seq_len - continuation_tokens`` tokens are prefilled with the method's attention (KV cache
kept), then the last ``continuation_tokens`` run with exact attention (SDPA) over that cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from omegaconf import MISSING

from flex_pbs.runner.checks import positive_int, require
from flex_pbs.runner.measure import perplexity, sparse_prefill_then_exact, token_losses
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.session import Session, evaluation_ids
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
class ContinuationTask:
    """Perplexity of the last ``continuation_tokens`` tokens, run with exact attention over the
    KV cache of a prefill of the others with the method's attention."""

    name: str = MISSING
    continuation_tokens: int = MISSING
    recall: bool = MISSING


def check(task: ContinuationTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    positive_int("task.continuation_tokens", task.continuation_tokens)
    require(
        seq_len - task.continuation_tokens >= 1,
        f"task.continuation_tokens ({task.continuation_tokens}) must be below seq_len ({seq_len}): "
        "the prefill needs at least one token",
    )


def continuation_of(method: Method, spec: RunSpec, session: Session, ids: torch.Tensor) -> tuple[dict, dict]:
    """One method's row (continuation NLL and perplexity, prefill density and recall) and its
    details: the prefill's per-layer stats (None for dense).

    Args:
        ids: ``[1, seq_len]``; the last ``task.continuation_tokens`` are the scored continuation.
    """
    task = spec.task
    sparse = method.engine is not None
    prefill_tokens = spec.seq_len - task.continuation_tokens
    logits, summary = sparse_prefill_then_exact(
        session, method.engine, ids[:, :prefill_tokens], ids[:, prefill_tokens:], spec.dense_layers,
        spec.layer_thresholds, collect_stats=sparse, recall=sparse and task.recall,
    )
    # Token P is predicted by the prefill's last logit, the others by the continuation pass.
    losses = token_losses(logits, ids[:, prefill_tokens - 1 :])
    row = {
        **method_fields(method),
        "seq_len": spec.seq_len,
        "prefill_tokens": prefill_tokens,
        "continuation_tokens": task.continuation_tokens,
        "nll": float(losses.double().mean()),
        "perplexity": perplexity(losses),
        "density": summary["density"] if sparse else 1.0,
        "permuted_heads": summary["permuted_heads"] if sparse else 0.0,
        "recall": (summary["recall"] if sparse else 1.0) if task.recall else None,
    }
    return row, {"stats": summary}


_DENSE_ROWS: dict[tuple, tuple[dict, dict]] = {}


def plot_continuation(rows: list[dict[str, Any]], path: Path) -> None:
    """Per method: continuation perplexity, its change vs dense, and the prefill's density and
    recall."""
    labels = [r["method"] for r in rows]
    first = rows[0]
    fig = Figure(figsize=(13, 4), layout="constrained")
    ppl, delta, density = fig.subplots(1, 3)
    grouped_bars(ppl, labels, {"perplexity": [r["perplexity"] for r in rows]}, "perplexity",
                 f"last {first['continuation_tokens']} of {first['seq_len']} tokens, exact attention")
    grouped_bars(delta, labels, {"change": [r["delta_pct"] for r in rows]}, "change vs dense (%)",
                 "continuation perplexity change vs dense")
    grouped_bars(density, labels, {"density": [r["density"] for r in rows], "recall": [r["recall"] for r in rows]},
                 "mean over layers and heads", f"prefill of {first['prefill_tokens']} tokens: density, recall")
    density.set_ylim(0, 1.15)
    fig.savefig(path, dpi=120)


def continuation_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Continuation perplexity and NLL after each method's prefill, their change vs dense, and
    the prefill's density and recall."""
    ids = evaluation_ids(spec, session)
    rows, details = [], {}
    for method in progress(compared_methods(spec), desc="methods", unit="method"):
        if method.engine is None:  # dense is the same in every job of a sweep: measure it once
            key = (id(session), spec.text, spec.seq_len, spec.seed, repr(spec.task))
            if key not in _DENSE_ROWS:
                _DENSE_ROWS.clear()
                _DENSE_ROWS[key] = continuation_of(method, spec, session, ids)
            row, details[method.name] = _DENSE_ROWS[key]
            row = dict(row)
        else:
            row, details[method.name] = continuation_of(method, spec, session, ids)
        rows.append(row)
    for row in rows:
        row["delta_pct"] = relative_change_pct(row["perplexity"], rows[0]["perplexity"])
        row["delta_nll"] = row["nll"] - rows[0]["nll"]
    columns = [
        Column("method", "method"),
        Column("prefill_tokens", "prefill"),
        Column("continuation_tokens", "continuation"),
        Column("perplexity", "perplexity", "{:.3f}"),
        Column("delta_pct", "Δ vs dense (%)", "{:+.2f}"),
        Column("nll", "NLL", "{:.4f}"),
        Column("delta_nll", "Δ NLL", "{:+.4f}"),
        Column("density", "prefill density", "{:.3f}"),
        Column("recall", "prefill recall", "{:.3f}"),
    ]
    split = (
        f"the first {rows[0]['prefill_tokens']} tokens are prefilled with the method's attention, keeping the KV "
        f"cache; the last {spec.task.continuation_tokens} run with exact attention (SDPA) over that cache, as in "
        "deployment (sparse prefill, exact decode). The first continuation token is scored by the prefill's last "
        "logit. task=perplexity's tail, by contrast, also attends sparsely from the scored tokens."
    )
    notes = [*random_weights_notes(session, spec), split]
    result = TaskResult("continuation", rows, columns, details, notes)
    return result, partial(plot_continuation, rows)
