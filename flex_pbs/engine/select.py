"""Stage 3, select: the fewest blocks per query-block row that reach the score threshold.

``select_stage`` returns the selection and FlexAttention's index lists of it (the fused kernel
``kernels.select_index`` computes both at once on CUDA).
"""

from __future__ import annotations

import math

import torch

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.kernels import use_fused
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.mask import MaskIndices, selection_indices

# Rows of blocks selected at once: bounds the sort's temporaries to about this many elements.
_SELECT_CHUNK_ELEMENTS = 1 << 24


def select_blocks(
    block_scores: torch.Tensor,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    threshold: float,
    max_density: float | None = None,
    counts_forced: bool = True,
) -> torch.Tensor:
    """Threshold selection with forced blocks first.

    Per query-block row, blocks are taken in order (forced blocks first, then by descending
    score) until the cumulative score reaches ``threshold`` of the row total over all
    candidates; the block that crosses the threshold is kept. Forced blocks are always kept and
    their score counts toward the threshold (``counts_forced=False``: the threshold applies to
    the other candidates' mass alone). ``threshold == 1`` keeps every candidate.

    Args:
        block_scores: float ``[B, H, nQ, nK]``; non-negative.
        candidates: bool, broadcastable to the scores: blocks that may be computed (causal).
        forced: bool, broadcastable: blocks always computed (a subset of the candidates).
        threshold: fraction in (0, 1].
        max_density: optional cap: at most ``ceil(max_density * candidates in row)`` blocks per
            row, forced ones never dropped.

    Returns:
        bool ``[B, H, nQ, nK]``, True where the block is computed.
    """
    shape = block_scores.shape
    candidates = candidates.expand(shape)
    forced = forced.expand(shape) & candidates
    if threshold >= 1.0 and max_density is None:
        return candidates.clone()
    rows_per_chunk = max(1, _SELECT_CHUNK_ELEMENTS // (shape[0] * shape[1] * shape[3]))
    chunks = [
        _select_rows(block_scores[:, :, r], candidates[:, :, r], forced[:, :, r], threshold, max_density, counts_forced)
        for r in (slice(s, s + rows_per_chunk) for s in range(0, shape[2], rows_per_chunk))
    ]
    return torch.cat(chunks, dim=2)


def _select_rows(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    threshold: float,
    max_density: float | None,
    counts_forced: bool,
) -> torch.Tensor:
    scores = scores.float().masked_fill(~candidates, 0.0)
    if not counts_forced:
        scores = scores.masked_fill(forced, 0.0)
    priority = scores.masked_fill(forced, math.inf).masked_fill(~candidates, -math.inf)
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    ranked = scores.gather(-1, order)
    keep = candidates.gather(-1, order)
    if threshold < 1.0:
        mass_before = torch.cumsum(ranked, dim=-1) - ranked
        keep &= mass_before < threshold * scores.sum(dim=-1, keepdim=True)
    if max_density is not None:
        budget = torch.ceil(candidates.sum(dim=-1, keepdim=True) * max_density)
        keep &= torch.arange(scores.shape[-1], device=scores.device) < budget
    selected = torch.zeros_like(keep).scatter(-1, order, keep)
    return selected | forced


def sink_blocks(key_order: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """One-hot of the key block holding original token 0: bool ``[B, Hkv, 1, nK]``."""
    sink_slot = (key_order == 0).to(torch.uint8).argmax(dim=-1)
    blocks = torch.arange(layout.num_kv_blocks, device=key_order.device)
    return (blocks == (sink_slot // layout.kv_block)[..., None])[:, :, None, :]


def forced_blocks(key_order: torch.Tensor, layout: BlockLayout, config: PBSConfig) -> torch.Tensor:
    """Blocks computed whatever their score: bool, broadcastable to ``[B, Hkv, nQ, nK]``.

    The diagonal segment, the sink block (``force_sink``) and the ``force_local_blocks``
    blocks before the diagonal segment.
    """
    device = key_order.device
    forced = layout.diagonal_blocks(device)
    if config.force_local_blocks:
        forced = forced | layout.preceding_blocks(config.force_local_blocks, device)
    if config.force_sink:
        forced = forced | sink_blocks(key_order, layout)
    return forced


def select_stage(
    scores: torch.Tensor, key_order: torch.Tensor, layout: BlockLayout, config: PBSConfig
) -> tuple[torch.Tensor, MaskIndices]:
    """Stage 3: ``(selected bool [B, Hq, nQ, nK], indices)``, ``indices`` being FlexAttention's
    block lists of the selection."""
    if use_fused(scores, config.backend):
        from flex_pbs.engine.kernels.select_index import select_and_index_fused

        return select_and_index_fused(scores, key_order, layout, config)
    causal = layout.causal_blocks(key_order)
    group = scores.shape[1] // key_order.shape[1]
    forced = forced_blocks(key_order, layout, config).expand_as(causal)
    selected = select_blocks(
        scores,
        candidates=causal.repeat_interleave(group, dim=1),
        forced=forced.repeat_interleave(group, dim=1),
        threshold=config.threshold,
        max_density=config.max_density,
        counts_forced=config.threshold_counts_forced,
    )
    return selected, selection_indices(selected, layout.diagonal_blocks(scores.device))
