"""The four tasks. Each compares ``dense`` (always first) with the configured method, except
``attention_stats``, which analyses the method's own plans.

* ``perplexity``: next-token loss over the whole sequence in one forward pass with the
  method's attention in every layer; perplexity of all predictions and of the last
  ``tail_tokens``; mean density and recall from flex_pbs's stats; a few passkey trials.
* ``passkey``: retrieval accuracy per context length and needle depth.
* ``attention_stats``: Q/K captured once, a plan built per layer; density and recall per head.
* ``latency``: median prefill time after a warm-up pass (which absorbs compilation).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import flex_pbs

from flex_pbs.engine.pipeline import build_plan
from flex_pbs.integrations.capture import capture_qkv
from flex_pbs.engine.config import PBSConfig
from flex_pbs.runner.data import passkeys
from flex_pbs.analysis.metrics import attention_recall, sample_query_blocks
from flex_pbs.runner import plots
from flex_pbs.runner.measure import passkey_trial, perplexity, stats_summary, timed_forward, token_losses
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.schema import RunSpec
from flex_pbs.runner.session import Session, attention, evaluation_ids


@dataclass(frozen=True)
class Method:
    """A method as the tasks run it: its name and engine config (None = dense SDPA)."""

    name: str
    engine: PBSConfig | None


def compared_methods(spec: RunSpec) -> list[Method]:
    """``dense`` first, then the configured method (once, if it is dense itself)."""
    dense = Method("dense", None)
    return [dense] if spec.engine is None else [dense, Method(spec.method, spec.engine)]


def method_fields(method: Method) -> dict[str, Any]:
    """The columns every row starts with: method name, its threshold and full engine config."""
    engine = None if method.engine is None else dataclasses.asdict(method.engine)
    return {"method": method.name, "threshold": None if engine is None else engine["threshold"], "engine": engine}


def relative_change_pct(value: float | None, reference: float | None) -> float | None:
    """``100 * (value - reference) / reference``, or None when either is missing."""
    if value is None or reference is None:
        return None
    return 100.0 * (value - reference) / reference


def random_weights_notes(session: Session, spec: RunSpec) -> list[str]:
    """The caveat that random-weight results measure the approximation, not model quality."""
    if not session.random_weights:
        return []
    return [
        f"model {spec.model.name} has random weights: evaluated on uniform random token ids "
        f"(seed {spec.seed}); passkey prompts use a byte-level tokenizer. Differences from dense "
        "measure the attention approximation, not model quality."
    ]


# ------------------------------------------------------------------------------- perplexity


def spread_passkey_trials(session: Session, length: int, count: int, new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``count`` passkey trials at ``length`` tokens, depths spread evenly over the context
    (none when ``count`` is 0)."""
    keys = passkeys(count, seed)
    depths = [(i + 0.5) / count for i in range(count)]
    return [
        passkey_trial(session, length, depth, key, new_tokens)
        for depth, key in tqdm(list(zip(depths, keys)), desc="passkey", unit="trial", leave=False, disable=not count)
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
        "recall": (summary["recall"] if sparse else 1.0) if task.recall else None,
        "wall_s": wall_s,
        "first_pass_s": first_pass_s,
    }
    return row, {"stats": summary, "passkey": trials}


_DENSE_ROWS: dict[tuple, tuple[dict, dict]] = {}


def perplexity_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Perplexity, tail perplexity, passkey accuracy, density, recall and wall time per method."""
    ids = evaluation_ids(spec, session)
    tail = min(spec.task.tail_tokens, spec.seq_len - 1)
    rows, details = [], {}
    for method in tqdm(compared_methods(spec), desc="methods", unit="method"):
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
    return result, partial(plots.plot_perplexity, rows, tail_header)


# ---------------------------------------------------------------------------------- passkey


def depth_key(depth: float) -> str:
    return f"depth_{depth:g}"


def passkey_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Accuracy per method, length and depth over ``trials`` pass keys (the same keys for every
    method)."""
    task = spec.task
    cells = [(length, depth) for length in task.lengths for depth in task.depths for _ in range(task.trials)]
    keys = passkeys(len(cells), spec.seed)
    rows, details = [], {}
    for method in tqdm(compared_methods(spec), desc="methods", unit="method"):
        with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds):
            trials = [
                {"requested_length": length, **passkey_trial(session, length, depth, key, task.new_tokens)}
                for (length, depth), key in tqdm(list(zip(cells, keys)), desc="passkey", unit="trial", leave=False)
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
    return result, partial(plots.plot_passkey, rows, depth_keys)


# -------------------------------------------------------------------------- attention_stats


def layer_plan_stats(q: torch.Tensor, k: torch.Tensor, engine: PBSConfig, recall: bool, query_blocks: int | None, seed: int) -> dict:
    """Density (and recall) per query head of one layer's plan, averaged over the batch."""
    plan = build_plan(q, k, engine)
    sampled = None if query_blocks is None else sample_query_blocks(plan.layout.num_q_blocks, query_blocks, seed)
    head_recall = attention_recall(q, k, plan, query_blocks=sampled).mean(0).tolist() if recall else None
    return {"density": plan.head_density.mean(0).float().tolist(), "recall": head_recall, "dense": plan.dense}


def attention_stats_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Per layer and head: the density and recall of the method's plan on captured Q/K."""
    task = spec.task
    captured = capture_qkv(session.model, evaluation_ids(spec, session), task.layers)
    per_layer = {}
    for layer, (q, k, _) in tqdm(captured.items(), desc="layers", unit="layer"):
        per_layer[layer] = layer_plan_stats(
            q.to(session.device), k.to(session.device), spec.engine, task.recall, task.recall_query_blocks, spec.seed
        )
    rows = []
    for layer, s in per_layer.items():
        recall = s["recall"]
        rows.append({
            **method_fields(Method(spec.method, spec.engine)),
            "seq_len": spec.seq_len,
            "layer": layer,
            "density": sum(s["density"]) / len(s["density"]),
            "min_head_density": min(s["density"]),
            "max_head_density": max(s["density"]),
            "recall": None if recall is None else sum(recall) / len(recall),
            "min_head_recall": None if recall is None else min(recall),
        })
    columns = [
        Column("layer", "layer"),
        Column("density", "density", "{:.3f}"),
        Column("min_head_density", "min head", "{:.3f}"),
        Column("max_head_density", "max head", "{:.3f}"),
        Column("recall", "recall", "{:.3f}"),
        Column("min_head_recall", "min head recall", "{:.3f}"),
    ]
    notes = random_weights_notes(session, spec) + [
        f"plans of method {spec.method} on every analysed layer (dense_layers is not applied here: "
        "the table shows what the method would do on each layer)"
    ]
    if any(s["dense"] for s in per_layer.values()):
        notes.append(f"seq_len {spec.seq_len} is short enough that the engine runs dense (density 1)")
    layers = list(per_layer)
    density = [per_layer[layer]["density"] for layer in layers]
    recall = [per_layer[layer]["recall"] for layer in layers] if task.recall else None
    result = TaskResult("attention_stats", rows, columns, {"layers": per_layer}, notes)
    return result, partial(plots.plot_layer_head_maps, density, recall, layers)


# ---------------------------------------------------------------------------------- latency


def latency_of(method: Method, spec: RunSpec, session: Session, ids: torch.Tensor) -> dict[str, Any]:
    """Warm-up pass (with stats, for density), then ``repeats`` timed prefill passes."""
    sparse = method.engine is not None
    with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds, collect_stats=sparse):
        warmup_s = timed_forward(session, ids, logits_to_keep=1)[1]
        density = stats_summary(flex_pbs.stats(session.model))["density"] if sparse else 1.0
    with attention(session, method.engine, spec.dense_layers, spec.layer_thresholds):
        times = [
            timed_forward(session, ids, logits_to_keep=1)[1]
            for _ in tqdm(range(spec.task.repeats), desc=f"prefill {method.name}", unit="pass", leave=False)
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


def latency_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Median prefill wall time per method, its speed-up over dense, and compile time apart."""
    ids = evaluation_ids(spec, session)
    rows = [latency_of(m, spec, session, ids) for m in tqdm(compared_methods(spec), desc="methods", unit="method")]
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
    return result, partial(plots.plot_latency, rows)


TASKS: dict[str, Callable[[RunSpec, Session], tuple[TaskResult, Callable[[Path], None]]]] = {
    "perplexity": perplexity_task,
    "passkey": passkey_task,
    "attention_stats": attention_stats_task,
    "latency": latency_task,
}
