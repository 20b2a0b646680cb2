"""The runner's tasks, one module each holding the task's schema (the dataclass Hydra composes
``configs/task/<name>.yaml`` onto), its value checks, its run and its figure. Each compares
``dense`` (always first) with the configured method, except ``attention_stats``, which analyses
the method's own plans.

* ``perplexity``: next-token loss over the whole sequence and its tail, density, recall, a few
  passkey trials.
* ``passkey``: retrieval accuracy per context length and needle depth.
* ``continuation``: perplexity of the last tokens run with exact attention over the KV cache of
  the method's prefill of the others (sparse prefill, exact decode, as deployed).
* ``retrieval``: RULER-style retrieval accuracy (multi-key, multi-value, variable tracking) per
  context length, with the same prefill-then-exact split and 95% Wilson intervals.
* ``attention_stats``: density and recall per layer and head of plans on captured Q/K.
* ``latency``: median prefill time after a warm-up pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flex_pbs.runner.tasks import (
    attention_stats,
    continuation,
    latency,
    passkey,
    perplexity,
    retrieval,
)

if TYPE_CHECKING:
    from flex_pbs.runner.report import TaskResult
    from flex_pbs.runner.schema import RunSpec
    from flex_pbs.runner.session import Session


@dataclass(frozen=True)
class Task:
    """A task: ``schema`` (its config dataclass), ``check(task, method, seq_len)`` (raises
    ``ConfigError``) and ``run(spec, session) -> (result, plot(path))``."""

    schema: type
    check: Callable[[Any, str, int], None]
    run: Callable[[RunSpec, Session], tuple[TaskResult, Callable[[Path], None]]]


TASKS: dict[str, Task] = {
    "perplexity": Task(perplexity.PerplexityTask, perplexity.check, perplexity.perplexity_task),
    "passkey": Task(passkey.PasskeyTask, passkey.check, passkey.passkey_task),
    "continuation": Task(continuation.ContinuationTask, continuation.check, continuation.continuation_task),
    "retrieval": Task(retrieval.RetrievalTask, retrieval.check, retrieval.retrieval_task),
    "attention_stats": Task(attention_stats.AttentionStatsTask, attention_stats.check, attention_stats.attention_stats_task),
    "latency": Task(latency.LatencyTask, latency.check, latency.latency_task),
}
