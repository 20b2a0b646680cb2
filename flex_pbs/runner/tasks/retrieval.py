"""RULER-style retrieval accuracy (multi-key, multi-value, variable tracking; prompts from
:mod:`flex_pbs.runner.retrieval_data`) per subtask and context length, the prompt prefilled
with the method's attention and the answer scored with exact attention over its KV cache, as
sparse prefill is deployed. The same prompts for every method."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from omegaconf import MISSING

from flex_pbs.runner.checks import ConfigError, positive_int, require
from flex_pbs.runner.measure import sparse_prefill_then_exact
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.retrieval_data import (
    HAYSTACKS,
    MAX_DIGITS,
    MAX_KEYS,
    SUBTASKS,
    PromptStyle,
    retrieval_prompt,
)
from flex_pbs.runner.session import Session
from flex_pbs.runner.tasks.common import (
    Method,
    compared_methods,
    method_fields,
    progress,
    random_weights_notes,
)

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals


@dataclass
class RetrievalTask:
    """RULER-style retrieval accuracy per subtask and context length."""

    name: str = MISSING
    subtasks: list[str] = MISSING
    lengths: list[int] = MISSING
    trials: int = MISSING
    haystack: str = MISSING
    chat_template: bool = MISSING
    multikey_needles: int = MISSING
    multivalue_needles: int = MISSING
    variable_chains: int = MISSING
    variable_hops: int = MISSING
    digits: int = MISSING


def check(task: RetrievalTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    require(len(task.subtasks) > 0, f"task.subtasks must list at least one of {list(SUBTASKS)}")
    for subtask in task.subtasks:
        require(subtask in SUBTASKS, f"task.subtasks[]: unknown subtask {subtask!r}; choose from {list(SUBTASKS)}")
    require(len(set(task.subtasks)) == len(task.subtasks), f"task.subtasks lists a subtask twice: {list(task.subtasks)}")
    require(len(task.lengths) > 0, "task.lengths must list at least one length")
    for length in task.lengths:
        positive_int("task.lengths[]", length)
    positive_int("task.trials", task.trials)
    require(task.haystack in HAYSTACKS, f"task.haystack must be one of {list(HAYSTACKS)}, got {task.haystack!r}")
    positive_int("task.multikey_needles", task.multikey_needles)
    require(task.multikey_needles <= MAX_KEYS, f"task.multikey_needles must be <= {MAX_KEYS} (distinct keys), "
                                               f"got {task.multikey_needles}")
    positive_int("task.multivalue_needles", task.multivalue_needles)
    positive_int("task.variable_chains", task.variable_chains)
    positive_int("task.variable_hops", task.variable_hops)
    positive_int("task.digits", task.digits)
    require(task.digits <= MAX_DIGITS, f"task.digits must be <= {MAX_DIGITS}, got {task.digits}")
    most = max(task.multikey_needles, task.multivalue_needles, task.variable_chains)
    require(9 * 10 ** (task.digits - 1) >= most,
            f"task.digits={task.digits} has too few distinct numbers for {most} needles or chains")


def wilson_interval(correct: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a success rate: ``correct`` of ``trials``
    (95% with the default ``z``). Unlike the normal approximation it stays in [0, 1] and is
    not empty at 0 or ``trials`` successes."""
    if not (isinstance(trials, int) and trials > 0 and isinstance(correct, int) and 0 <= correct <= trials):
        raise ValueError(f"need 0 <= correct <= trials and trials > 0, got {correct} of {trials}")
    rate, spread = correct / trials, z * z / trials
    centre = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Case:
    """One prompt: its ids ``[1, P]``, the answer's ids ``[1, A]`` and text."""

    subtask: str
    length: int
    trial: int
    prompt: torch.Tensor
    answer: torch.Tensor
    answer_text: str


def generator_knobs(task: RetrievalTask, subtask: str) -> dict[str, Any]:
    """The keyword arguments of a subtask's generator, from the task config."""
    style = PromptStyle(task.haystack, task.chat_template)
    knobs = {
        "multikey": {"needles": task.multikey_needles, "digits": task.digits},
        "multivalue": {"needles": task.multivalue_needles, "digits": task.digits},
        "variable_tracking": {"chains": task.variable_chains, "hops": task.variable_hops, "digits": task.digits},
    }
    return {**knobs[subtask], "style": style}


def encode(tokenizer, text: str, device: str) -> torch.Tensor:
    """``[1, n]`` ids of ``text`` without special tokens, as the generators count them."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)


def retrieval_cases(spec: RunSpec, session: Session) -> list[Case]:
    """Every prompt of the run, each seeded by (seed, subtask, length, trial) alone, so that
    each method, and each run with more subtasks or lengths, sees the same prompts."""
    task, tokenizer = spec.task, session.tokenizer
    require(not task.chat_template or bool(getattr(tokenizer, "chat_template", None)),
            f"task.chat_template=true but model {spec.model.name}'s tokenizer has no chat template: "
            "pass task.chat_template=false")
    cases = []
    for subtask in task.subtasks:
        knobs = generator_knobs(task, subtask)
        for length in task.lengths:
            for trial in range(task.trials):
                rng = random.Random(f"{spec.seed}/{subtask}/{length}/{trial}")
                try:
                    prompt, answer = retrieval_prompt(subtask, tokenizer, length, rng, **knobs)
                except ValueError as error:
                    raise ConfigError(f"task.lengths[]={length}, task.subtasks[]={subtask}: {error}") from None
                cases.append(Case(subtask, length, trial, encode(tokenizer, prompt, session.device),
                                  encode(tokenizer, answer, session.device), answer))
    return cases


def teacher_forced_argmax(
    session: Session, method: Method, spec: RunSpec, prompt: torch.Tensor, answer: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """The most likely token ``[A]`` at each answer position, the prompt ``[1, P]`` prefilled
    with the method's attention and the answer ``[1, A]`` teacher-forced with exact attention;
    and the prefill's stats (None for dense). The answer is what greedy decoding produces
    exactly when these equal its tokens."""
    sparse = method.engine is not None
    logits, summary = sparse_prefill_then_exact(
        session, method.engine, prompt, answer, spec.dense_layers, spec.layer_thresholds, collect_stats=sparse
    )
    return logits[0, :-1].argmax(-1), summary


def score(session: Session, method: Method, spec: RunSpec, case: Case) -> dict[str, Any]:
    """One trial: whether greedy decoding after the method's prefill gives the answer."""
    predicted, summary = teacher_forced_argmax(session, method, spec, case.prompt, case.answer)
    # A random-weight model can predict ids its byte-level tokenizer does not have.
    known = [i for i in predicted.tolist() if i < len(session.tokenizer)]
    return {
        "subtask": case.subtask,
        "length": case.length,
        "trial": case.trial,
        "prompt_tokens": int(case.prompt.shape[1]),
        "answer": case.answer_text,
        "predicted": session.tokenizer.decode(known),
        "correct": bool(torch.equal(predicted, case.answer[0])),
        "density": 1.0 if summary is None else summary["density"],
    }


def scored_trials(session: Session, method: Method, spec: RunSpec, cases: list[Case]) -> list[dict[str, Any]]:
    """Every case scored with one method, in order."""
    return [score(session, method, spec, case) for case in progress(cases, desc="retrieval", unit="trial", leave=False)]


def accuracy_rows(method: Method, trials: list[dict[str, Any]], task: RetrievalTask) -> list[dict[str, Any]]:
    """One row per subtask and length: accuracy, its 95% Wilson interval, mean prefill density."""
    rows = []
    for subtask in task.subtasks:
        for length in task.lengths:
            cell = [t for t in trials if t["subtask"] == subtask and t["length"] == length]
            correct = sum(t["correct"] for t in cell)
            low, high = wilson_interval(correct, len(cell))
            rows.append({
                **method_fields(method),
                "subtask": subtask,
                "length": length,
                "accuracy": correct / len(cell),
                "correct": correct,
                "trials": len(cell),
                "ci_low": low,
                "ci_high": high,
                "density": sum(t["density"] for t in cell) / len(cell),
                "prompt_tokens": sum(t["prompt_tokens"] for t in cell) / len(cell),
            })
    return rows


def plot_retrieval(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per subtask with 95% Wilson error bars, one bar per method, a panel per length."""
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    subtasks = list(dict.fromkeys(r["subtask"] for r in rows))
    fig = Figure(figsize=(1.5 + 2.2 * len(subtasks) * len(lengths), 4), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    width = 0.8 / len(methods)
    for ax, length in zip(axes, lengths):
        for i, method in enumerate(methods):
            cells = {r["subtask"]: r for r in rows if r["method"] == method and r["length"] == length}
            accuracy = [cells[s]["accuracy"] for s in subtasks]
            errors = [[cells[s]["accuracy"] - cells[s]["ci_low"] for s in subtasks],
                      [cells[s]["ci_high"] - cells[s]["accuracy"] for s in subtasks]]
            positions = [x + (i - (len(methods) - 1) / 2) * width for x in range(len(subtasks))]
            bars = ax.bar(positions, accuracy, width, yerr=errors, capsize=3, label=method)
            ax.bar_label(bars, labels=[f"{a:.0%}" for a in accuracy], fontsize=8, label_type="center")
        ax.set_xticks(range(len(subtasks)), subtasks)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"{length} tokens")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


_DENSE_TRIALS: dict[tuple, list[dict[str, Any]]] = {}


def retrieval_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Accuracy per method, subtask and length with its 95% Wilson interval, the change vs dense
    in points, and the mean prefill density."""
    task = spec.task
    cases = retrieval_cases(spec, session)
    rows, details = [], {}
    for method in progress(compared_methods(spec), desc="methods", unit="method"):
        if method.engine is None:  # dense is the same in every job of a sweep: measure it once
            key = (id(session), spec.seed, repr(task))
            if key not in _DENSE_TRIALS:
                _DENSE_TRIALS.clear()
                _DENSE_TRIALS[key] = scored_trials(session, method, spec, cases)
            details[method.name] = _DENSE_TRIALS[key]
        else:
            details[method.name] = scored_trials(session, method, spec, cases)
        rows += accuracy_rows(method, details[method.name], task)
    dense = {(r["subtask"], r["length"]): r["accuracy"] for r in rows if r["method"] == "dense"}
    for row in rows:
        row["delta_points"] = 100.0 * (row["accuracy"] - dense[row["subtask"], row["length"]])
    columns = [
        Column("method", "method"),
        Column("subtask", "subtask"),
        Column("length", "context"),
        Column("accuracy", f"accuracy (n={task.trials})", "{:.0%}"),
        Column("ci_low", "95% CI low", "{:.0%}"),
        Column("ci_high", "95% CI high", "{:.0%}"),
        Column("delta_points", "Δ vs dense (points)", "{:+.0f}"),
        Column("density", "prefill density", "{:.3f}"),
    ]
    scoring = (
        "each prompt is prefilled with the method's attention, then its answer is teacher-forced with exact "
        "attention (SDPA) over that KV cache; a trial is correct when every answer token is the most likely one, "
        "i.e. when greedy decoding gives the answer. Intervals: 95% Wilson."
    )
    prompts = (
        f"prompts ({task.haystack} haystack, chat template {'on' if task.chat_template else 'off'}): multikey "
        f"{task.multikey_needles} keys (one asked), multivalue {task.multivalue_needles} values, variable_tracking "
        f"{task.variable_chains} chain(s) of {task.variable_hops} hops; {task.digits}-digit numbers"
    )
    notes = [*random_weights_notes(session, spec), scoring, prompts]
    result = TaskResult("retrieval", rows, columns, details, notes)
    return result, partial(plot_retrieval, rows)
