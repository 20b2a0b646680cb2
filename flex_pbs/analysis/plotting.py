"""Figures and numbers for exploring PBS masks: where attention goes before and after the
segment-local key permutation, which blocks each method computes, and how density and recall
trade off over thresholds and layers.

Figure functions are pure: they build a ``matplotlib.figure.Figure`` without pyplot (no global
figure state, nothing shown) and return it; a notebook displays it, a script saves it with
``fig.savefig``. The heavy lifting (plans, recalls, sweeps) lives in separate functions that
return plain numbers, so figures can be redrawn without recomputing.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure

from flex_pbs.analysis.metrics import attention_recall
from flex_pbs.engine.layout import cdiv
from flex_pbs.engine.methods import METHODS, method_config
from flex_pbs.engine.pipeline import PBSPlan, build_plan

POOLINGS = ("max", "sum")
# Attention probabilities held at once while pooling a heatmap (elements): bounds its memory.
_HEATMAP_CHUNK_ELEMENTS = 1 << 24
# Block states drawn by `block_masks`, in colour-map order.
_BLOCK_STATES = ("not causal", "skipped", "computed", "diagonal segment\n(exact, always)")
_BLOCK_COLOURS = ("white", "0.85", "tab:blue", "tab:orange")


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor [B, H, L, D], got {shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, length and head dim "
            "(a plain prefill: queries and keys of the same positions)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def _check_index(name: str, value: int, size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")


# --------------------------------------------------------------------------- plans and numbers


def method_plans(
    q: torch.Tensor, k: torch.Tensor, methods: Iterable[str], **overrides
) -> dict[str, PBSPlan]:
    """The plan of each named method (``flex_pbs.engine.methods``) on one layer's Q/K.

    ``dense`` gives the dense plan: every causal block, original key order (its config takes
    only the block geometry from ``overrides``; the threshold does not apply).

    Args:
        q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]`` (post-RoPE, original order).
        methods: names from ``flex_pbs.engine.methods.METHODS``.
        overrides: ``PBSConfig`` fields applied to every method (e.g. ``threshold=0.9``,
            ``block_size=64``).

    Returns:
        ``{method: PBSPlan}`` in the order given.
    """
    _check_qk(q, k)
    plans = {}
    for name in methods:
        if name == "dense":
            geometry = method_config("xattention", **overrides)
            plans[name] = build_plan(q, k, geometry.replace(dense_below=k.shape[2] + 1))
        else:
            plans[name] = build_plan(q, k, method_config(name, **overrides))
    if not plans:
        raise ValueError(f"methods is empty; choose from {sorted(METHODS)}")
    return plans


def head_recalls(
    q: torch.Tensor, k: torch.Tensor, plans: Mapping[str, PBSPlan], head: int, batch: int = 0
) -> dict[str, float]:
    """Attention recall of one query head under each plan (``flex_pbs.analysis.metrics.attention_recall``).

    Args:
        q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]``, the inputs the plans were built from.
        plans: ``{method: PBSPlan}``.
        head: query head index; batch: batch element.

    Returns:
        ``{method: recall in [0, 1]}``.
    """
    _check_qk(q, k)
    _check_index("head", head, q.shape[1])
    _check_index("batch", batch, q.shape[0])
    return {name: float(attention_recall(q, k, plan)[batch, head]) for name, plan in plans.items()}


def sweep_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    methods: Sequence[str],
    thresholds: Sequence[float],
    *,
    query_blocks: torch.Tensor | None = None,
    **overrides,
) -> list[dict]:
    """Density and recall of sparse methods at several thresholds, over all heads of a layer.

    Args:
        q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]`` (post-RoPE, original order).
        methods: sparse method names (``dense`` has no threshold: leave it out).
        thresholds: values in (0, 1].
        query_blocks: optional long ``[n]``: evaluate recall on these query blocks only
            (``flex_pbs.analysis.metrics.sample_query_blocks``), for long inputs.
        overrides: other ``PBSConfig`` fields applied to every method.

    Returns:
        One dict per (method, threshold), methods outer: ``method``, ``threshold``,
        ``density`` and ``recall`` (means over batch and query heads), ``head_densities`` and
        ``head_recalls`` (lists of ``B * Hq`` floats).
    """
    if "dense" in methods:
        raise ValueError("'dense' has no threshold (density and recall are 1): leave it out of the sweep")
    if not methods or not thresholds:
        raise ValueError(f"need at least one method and one threshold, got {list(methods)} and {list(thresholds)}")
    rows = []
    for name in methods:
        for threshold in thresholds:
            plan = method_plans(q, k, [name], threshold=threshold, **overrides)[name]
            densities = plan.head_density.flatten()
            recalls = attention_recall(q, k, plan, query_blocks=query_blocks).flatten()
            rows.append(
                {
                    "method": name,
                    "threshold": float(threshold),
                    "density": float(densities.mean()),
                    "recall": float(recalls.mean()),
                    "head_densities": densities.tolist(),
                    "head_recalls": recalls.tolist(),
                }
            )
    return rows


def layer_table(
    qkv_by_layer: Mapping[int, Sequence[torch.Tensor]],
    threshold: float,
    methods: Sequence[str] = ("xattention", "pbs_antidiagonal"),
    **overrides,
) -> list[dict]:
    """Per-layer density and recall of several methods (default: without vs with permutation).

    Args:
        qkv_by_layer: ``{layer: (q, k, ...)}`` as returned by ``flex_pbs.integrations.capture.capture_qkv``.
        threshold: the selection threshold of every method.
        methods: sparse method names; the default pair differs only in the permutation.
        overrides: other ``PBSConfig`` fields applied to every method.

    Returns:
        One dict per layer, in layer order: ``layer``, then ``"<method> density"`` and
        ``"<method> recall"`` (means over heads) for each method.
    """
    if not qkv_by_layer:
        raise ValueError("qkv_by_layer is empty: capture at least one layer with capture_qkv")
    table = []
    for layer in sorted(qkv_by_layer):
        q, k = qkv_by_layer[layer][:2]
        row: dict = {"layer": layer}
        for result in sweep_layer(q, k, methods, [threshold], **overrides):
            row[f"{result['method']} density"] = result["density"]
            row[f"{result['method']} recall"] = result["recall"]
        table.append(row)
    return table


def format_table(rows: Sequence[Mapping], digits: int = 3) -> str:
    """A Markdown table of dicts sharing their keys (floats rounded to ``digits``).

    Display it in a notebook with ``IPython.display.Markdown(format_table(rows))``.
    """
    if not rows:
        raise ValueError("rows is empty")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"row {index} has columns {list(row)}, expected {columns} like row 0")

    def cell(value) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- token-level heatmap


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    head: int,
    key_order: torch.Tensor | None = None,
    *,
    pool: int = 1,
    pooling: str = "max",
    batch: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact causal softmax attention of one query head, pooled into ``pool × pool`` tiles.

    Rows are queries (original order); columns are key slots: original positions, or the
    permuted layout when ``key_order`` is given (column ``j`` shows key ``key_order[j]``).
    Computed in float32 in chunks of rows holding at most ``2**24`` probabilities.

    Args:
        q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]`` (original order).
        head: query head; its KV head is ``head // (Hq // Hkv)``.
        key_order: optional long ``[B, Hkv, L]`` (``PBSPlan.key_order``).
        pool: tokens per tile side.
        pooling: ``"max"``: largest probability in the tile (a single important key stays
            visible); ``"sum"``: attention mass of the tile's keys averaged over its query
            rows (each row of tiles sums to 1).
        batch: batch element; scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        float32 ``[ceil(L / pool), ceil(L / pool)]``; 0 where no key is visible.
    """
    _check_qk(q, k)
    _check_index("head", head, q.shape[1])
    _check_index("batch", batch, q.shape[0])
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be a positive int, got {pool!r}")
    length, dim = q.shape[2], q.shape[3]
    kv_head = head // (q.shape[1] // k.shape[1])
    positions = torch.arange(length)
    if key_order is not None:
        if key_order.shape != (k.shape[0], k.shape[1], length):
            raise ValueError(f"key_order must have shape {(k.shape[0], k.shape[1], length)} [B, Hkv, L], got {tuple(key_order.shape)}")
        positions = key_order[batch, kv_head].cpu()
    queries = q[batch, head].float().cpu()
    keys = k[batch, kv_head].float().cpu()[positions]
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)

    tiles = cdiv(length, pool)
    pad = tiles * pool - length
    pooled = torch.zeros(tiles, tiles)
    rows_per_chunk = pool * max(1, _HEATMAP_CHUNK_ELEMENTS // (pool * length))
    for start in range(0, length, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, length))
        logits = (queries[rows] @ keys.T) * scale
        probs = torch.softmax(logits.masked_fill(positions[None, :] > rows[:, None], -math.inf), dim=-1)
        probs = torch.nn.functional.pad(probs, (0, pad, 0, -rows.numel() % pool))
        blocks = probs.view(-1, pool, tiles, pool)
        tile_rows = slice(start // pool, start // pool + blocks.shape[0])
        if pooling == "max":
            pooled[tile_rows] = blocks.amax(dim=(1, 3))
        else:
            real_rows = torch.clamp(length - torch.arange(start, start + blocks.shape[0] * pool, pool), max=pool)
            pooled[tile_rows] = blocks.sum(dim=(1, 3)) / real_rows[:, None]
    return pooled


def attention_heatmap(
    q: torch.Tensor,
    k: torch.Tensor,
    head: int,
    key_order: torch.Tensor | None = None,
    *,
    segment_size: int | None = None,
    max_pixels: int = 512,
    pooling: str = "max",
    dynamic_range: float = 1e-4,
    batch: int = 0,
    scale: float | None = None,
    title: str | None = None,
) -> Figure:
    """Token-level causal attention of one query head, before and after the key permutation.

    Left panel: keys in original order; right panel (when ``key_order`` is given): keys in the
    segment-local permuted layout, where PBS wants the keys important to a segment's queries
    packed at the segment's start. Long inputs are pooled (see :func:`pooled_attention`) to at
    most ``max_pixels`` tiles per side. Colours are on a log scale spanning ``dynamic_range``
    of the largest value, so scattered important keys stay visible; white is "no visible key".

    Args:
        q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]`` (original order).
        head: query head to show.
        key_order: optional long ``[B, Hkv, L]`` (``PBSPlan.key_order``) for the second panel.
        segment_size: draw segment boundaries every this many tokens (``PBSConfig.segment_size``).
        max_pixels: tiles per side at most; pooling: ``"max"`` or ``"sum"``.
        dynamic_range: smallest value shown, relative to the largest (in (0, 1)).
        batch: batch element; scale: softmax scale, default ``1/sqrt(D)``.
        title: figure title; default names the head and the pooling.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not 0.0 < dynamic_range < 1.0:
        raise ValueError(f"dynamic_range must be in (0, 1), e.g. 1e-4, got {dynamic_range!r}")
    if segment_size is not None and (isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1):
        raise ValueError(f"segment_size must be a positive int or None, got {segment_size!r}")
    _check_qk(q, k)
    length = q.shape[2]
    pool = max(1, cdiv(length, max_pixels))
    orders = [("original key order", "key position", None)]
    if key_order is not None:
        orders.append(("after segment-local permutation", "key slot (permuted layout)", key_order))
    maps = [
        pooled_attention(q, k, head, order, pool=pool, pooling=pooling, batch=batch, scale=scale)
        for _, _, order in orders
    ]
    vmax = max(float(m.max()) for m in maps)
    norm = LogNorm(vmin=vmax * dynamic_range, vmax=vmax)
    cmap = colormaps["magma"].with_extremes(bad="white")

    fig = Figure(figsize=(5.2 * len(orders) + 1.0, 5.0), layout="constrained")
    axes = fig.subplots(1, len(orders), squeeze=False)[0]
    for ax, (panel_title, xlabel, _), pooled in zip(axes, orders, maps):
        shown = np.ma.masked_equal(pooled.numpy(), 0.0)
        # Default (antialiased) interpolation: a one-tile stripe dims but survives downsampling.
        image = ax.imshow(shown, cmap=cmap, norm=norm, extent=(0, length, length, 0))
        if segment_size is not None:
            for boundary in range(segment_size, length, segment_size):
                ax.axvline(boundary, color="tab:cyan", linewidth=0.5, linestyle=(0, (2, 4)), alpha=0.7)
                ax.axhline(boundary, color="tab:cyan", linewidth=0.5, linestyle=(0, (2, 4)), alpha=0.7)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("query position")
    pooled_what = "probability (max over tile)" if pooling == "max" else "attention mass per query (sum over tile)"
    fig.colorbar(image, ax=list(axes), shrink=0.85, label=f"attention {pooled_what}")
    tiles = f", {pool}×{pool} tokens per pixel" if pool > 1 else ""
    segments = f", segment lines every {segment_size} tokens" if segment_size is not None else ""
    fig.suptitle(title or f"Causal attention of query head {head} ({pooling}-pooled{tiles}{segments})")
    return fig


# --------------------------------------------------------------------------- block masks


def block_states(plan: PBSPlan, head: int, batch: int = 0) -> np.ndarray:
    """Each block of one head, coded as an index into the block-state legend.

    Returns:
        int ``[nQ, nK]`` (permuted key layout): 0 not causal, 1 causal but skipped, 2 computed,
        3 in the diagonal segment (always computed, token-level causal).
    """
    _check_index("head", head, plan.block_mask.shape[1])
    _check_index("batch", batch, plan.block_mask.shape[0])
    group = plan.block_mask.shape[1] // plan.causal_blocks.shape[1]
    computed = plan.block_mask[batch, head].cpu()
    causal = plan.causal_blocks[batch, head // group].cpu()
    diagonal = plan.layout.diagonal_blocks(torch.device("cpu")) & computed
    states = causal.long() + computed.long() + diagonal.long()
    return states.numpy()


def block_masks(
    plans: Mapping[str, PBSPlan],
    head: int,
    recalls: Mapping[str, float] | None = None,
    *,
    batch: int = 0,
    title: str | None = None,
) -> Figure:
    """The block masks of several methods side by side, for one query head.

    Each panel shows which ``block_size × key_block_size`` blocks the method computes (query block
    rows, key block columns in the method's own key layout: permuted for ``pbs``/``pbs_mean``),
    with the head's density (computed / causal blocks) and, if given, recall in its title.
    A dense plan (``method_plans(..., ["dense"])``) shows the causal mask.

    Args:
        plans: ``{method: PBSPlan}``, e.g. from :func:`method_plans`.
        head: query head to show.
        recalls: optional ``{method: recall of this head}`` (e.g. :func:`head_recalls`);
            must cover every plan.
        batch: batch element; title: figure title (default names the head).
    """
    if not plans:
        raise ValueError("plans is empty: pass {method: PBSPlan}, e.g. from method_plans")
    if recalls is not None and set(plans) - set(recalls):
        raise ValueError(f"recalls has no entry for {sorted(set(plans) - set(recalls))}; pass one per plan or None")
    cmap = ListedColormap(_BLOCK_COLOURS)
    norm = BoundaryNorm(np.arange(len(_BLOCK_STATES) + 1) - 0.5, len(_BLOCK_STATES))

    fig = Figure(figsize=(3.3 * len(plans) + 1.6, 3.9), layout="constrained")
    axes = fig.subplots(1, len(plans), squeeze=False)[0]
    for ax, (name, plan) in zip(axes, plans.items()):
        # Cells drawn in token proportions: query blocks may be taller than key blocks are wide.
        aspect = plan.layout.block_size / plan.layout.kv_block
        image = ax.imshow(block_states(plan, head, batch), cmap=cmap, norm=norm, interpolation="nearest", aspect=aspect)
        permuted = not torch.equal(plan.key_order, torch.arange(plan.layout.kv_len).expand_as(plan.key_order))
        density = float(plan.head_density[batch, head])
        recall = f", recall {recalls[name]:.3f}" if recalls is not None else ""
        ax.set_title(f"{name}\ndensity {density:.2f}{recall}", fontsize=10)
        ax.set_xlabel("key block (permuted layout)" if permuted else "key block (original order)")
        ax.set_ylabel("query block")
    colorbar = fig.colorbar(image, ax=list(axes), shrink=0.8, ticks=range(len(_BLOCK_STATES)))
    colorbar.ax.set_yticklabels(_BLOCK_STATES, fontsize=8)
    colorbar.set_label("block state")
    layout = next(iter(plans.values())).layout
    blocks = f"{layout.block_size}" if layout.kv_block == layout.block_size else f"{layout.block_size}×{layout.kv_block}"
    fig.suptitle(title or f"Block masks of query head {head} ({blocks}-token blocks)")
    return fig


# --------------------------------------------------------------------------- sweeps


def _rows_by_method(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    if not rows:
        raise ValueError("rows is empty: pass the output of sweep_layer")
    needed = {"method", "threshold", "density", "recall", "head_densities", "head_recalls"}
    missing = needed - set(rows[0])
    if missing:
        raise ValueError(f"rows lack {sorted(missing)}: pass the output of sweep_layer")
    grouped: dict[str, list[Mapping]] = {}
    for row in rows:
        grouped.setdefault(row["method"], []).append(row)
    return {name: sorted(group, key=lambda r: r["threshold"]) for name, group in grouped.items()}


def density_vs_threshold(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Mean density over heads against the threshold, per method; the band spans all heads.

    Args:
        rows: the output of :func:`sweep_layer`.
        title: figure title.
    """
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, group in _rows_by_method(rows).items():
        thresholds = [r["threshold"] for r in group]
        line = ax.plot(thresholds, [r["density"] for r in group], marker="o", label=name)[0]
        ax.fill_between(
            thresholds,
            [min(r["head_densities"]) for r in group],
            [max(r["head_densities"]) for r in group],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("threshold (share of estimated score kept)")
    ax.set_ylabel("density (computed / causal blocks)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(title="method (band: min–max over heads)")
    ax.set_title(title or "Density vs threshold")
    return fig


def recall_vs_density(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Mean recall against mean density over heads, one curve per method (up and left is
    better), one point per threshold (density grows with it); faint points are single heads.

    Args:
        rows: the output of :func:`sweep_layer`.
        title: figure title.
    """
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    by_method = _rows_by_method(rows)
    for name, group in by_method.items():
        line = ax.plot([r["density"] for r in group], [r["recall"] for r in group], marker="o", label=name)[0]
        for r in group:
            ax.scatter(r["head_densities"], r["head_recalls"], s=9, color=line.get_color(), alpha=0.3, linewidths=0)
    thresholds = sorted({r["threshold"] for group in by_method.values() for r in group})
    ax.set_xlabel("density (computed / causal blocks)")
    ax.set_ylabel("recall (exact attention mass computed)")
    ax.grid(alpha=0.3)
    ax.legend(title=f"method: thresholds {thresholds[0]:g}…{thresholds[-1]:g}\nleft to right; points: heads", fontsize=9)
    ax.set_title(title or "Recall vs density")
    return fig
