"""Per-head adaptive permutation: permute a KV head only where it pays, measured on samples.

A segment-local permutation gathers a head's heavy keys but scatters its local and slash
patterns, and block estimators over-trust sorted layouts (a block of keys that are all alike
looks more decisive than it is). So each KV head is tried both ways on a sample of query
blocks: score and select exactly as the engine would, then measure the exact attention mass
the selection keeps. A head is permuted only if, on the sample, the permuted layout computes
no more blocks *and* keeps at least as much exact mass (within ``adaptive_tolerance``).
"""

from __future__ import annotations

import torch

from .config import PBSConfig
from .layout import BlockLayout
from .metrics import selection_recall
from .permutation import identity_key_order, permute_keys
from .scoring import estimate_block_scores
from .selection import forced_blocks, select_blocks


def sample_segments(layout: BlockLayout, count: int, device: torch.device) -> torch.Tensor:
    """The query blocks of ``count`` segments spread evenly past the first: long ``[n]``.

    Whole segments, so that blocks at a segment's start and end are both represented; the
    first segment is skipped (it has no earlier segment to select from); the last query block
    is always included.
    """
    first_position, _ = layout.query_block_bounds(device)
    segment = first_position // layout.segment_size
    eligible = segment >= 1
    segments = segment[eligible].unique()
    if segments.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    picks = torch.linspace(0, segments.numel() - 1, count, device=device).round().long().unique()
    chosen = torch.isin(segment, segments[picks]) & eligible
    chosen[-1] = True
    return chosen.nonzero().flatten()


def layout_cost(
    q: torch.Tensor,
    k: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    config: PBSConfig,
    scale: float,
    query_blocks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks selected and exact mass kept on ``query_blocks`` with keys in ``key_order``.

    Returns:
        ``(blocks float [B, Hkv], recall float [B, Hkv])``, summed (blocks) and averaged
        (recall) over the query heads of each KV head.
    """
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    k_layout = permute_keys(k, key_order)
    scores = estimate_block_scores(q, k_layout, key_order, layout, config, scale, query_blocks=query_blocks)
    causal = layout.causal_blocks(key_order)[:, :, query_blocks]
    forced = forced_blocks(key_order, layout, config, query_blocks).expand_as(causal)
    selected = select_blocks(
        scores,
        candidates=causal.repeat_interleave(group, dim=1),
        forced=forced.repeat_interleave(group, dim=1),
        threshold=config.threshold,
        max_density=config.max_density,
    )
    blocks = selected.sum(dim=(-1, -2)).float().view(batch, kv_heads, group).sum(-1)
    recall = selection_recall(q, k, key_order, selected, layout, query_blocks, scale=scale)
    return blocks, recall.view(batch, kv_heads, group).mean(-1)


def adaptive_key_order(
    q: torch.Tensor,
    k: torch.Tensor,
    permuted_order: torch.Tensor,
    layout: BlockLayout,
    config: PBSConfig,
    scale: float,
) -> torch.Tensor:
    """``permuted_order`` for the KV heads where permuting pays, the identity elsewhere.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; permuted_order: long ``[B, Hkv, Lk]``.

    Returns:
        long ``[B, Hkv, Lk]``.
    """
    identity = identity_key_order(k)
    query_blocks = sample_segments(layout, config.adaptive_samples, q.device)
    if query_blocks.numel() == 0:
        return identity
    blocks_id, recall_id = layout_cost(q, k, identity, layout, config, scale, query_blocks)
    blocks_perm, recall_perm = layout_cost(q, k, permuted_order, layout, config, scale, query_blocks)
    permute = (blocks_perm <= (1 - config.adaptive_margin) * blocks_id) & (
        recall_perm >= recall_id - config.adaptive_tolerance
    )
    return torch.where(permute[..., None], permuted_order, identity)
