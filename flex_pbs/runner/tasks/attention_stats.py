"""Density and recall of a method's plans per layer and head, on Q/K captured from the model
once (a plan built per layer)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
from matplotlib.figure import Figure
from omegaconf import MISSING

from flex_pbs.analysis.metrics import attention_recall, sample_query_blocks
from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.pipeline import build_plan
from flex_pbs.integrations.capture import capture_qkv
from flex_pbs.runner.checks import non_negative_int, positive_int, require
from flex_pbs.runner.report import Column, TaskResult
from flex_pbs.runner.session import Session, evaluation_ids
from flex_pbs.runner.tasks.common import (
    Method,
    method_fields,
    progress,
    random_weights_notes,
)

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec


@dataclass
class AttentionStatsTask:
    """Density and recall of the method's plans per layer and head, from captured Q/K."""

    name: str = MISSING
    recall: bool = MISSING
    recall_query_blocks: Optional[int] = MISSING
    layers: Optional[List[int]] = MISSING


def check(task: AttentionStatsTask, method: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` for out-of-range values."""
    require(method != "dense", "method: task=attention_stats analyses a sparse method's plans; dense has none")
    if task.recall_query_blocks is not None:
        positive_int("task.recall_query_blocks", task.recall_query_blocks)
    for layer in task.layers or ():
        non_negative_int("task.layers[]", layer)


def layer_plan_stats(q: torch.Tensor, k: torch.Tensor, engine: PBSConfig, recall: bool, query_blocks: int | None, seed: int) -> dict:
    """Density (and recall) per query head of one layer's plan, averaged over the batch."""
    plan = build_plan(q, k, engine)
    sampled = None if query_blocks is None else sample_query_blocks(plan.layout.num_q_blocks, query_blocks, seed)
    head_recall = attention_recall(q, k, plan, query_blocks=sampled).mean(0).tolist() if recall else None
    return {"density": plan.head_density.mean(0).float().tolist(), "recall": head_recall, "dense": plan.dense}


def plot_layer_head_maps(density: list[list[float]], recall: list[list[float]] | None, layers: list[int], path: Path) -> None:
    """Heatmaps of density (and recall) per layer (rows) and query head (columns)."""
    panels = [("density (computed / causal blocks)", density)] + ([("recall", recall)] if recall else [])
    fig = Figure(figsize=(5 * len(panels), 2 + 0.25 * len(layers)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels):
        image = ax.imshow(values, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xticks(range(len(values[0])))
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def attention_stats_task(spec: RunSpec, session: Session) -> tuple[TaskResult, Callable[[Path], None]]:
    """Per layer and head: the density and recall of the method's plan on captured Q/K."""
    task = spec.task
    captured = capture_qkv(session.model, evaluation_ids(spec, session), task.layers)
    per_layer = {}
    for layer, (q, k, _) in progress(captured.items(), desc="layers", unit="layer"):
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
    return result, partial(plot_layer_head_maps, density, recall, layers)
