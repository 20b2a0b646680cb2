"""How good a plan is: the share of exact attention mass that its computed blocks contain."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from flex_pbs.engine.layout import BlockLayout

if TYPE_CHECKING:
    from flex_pbs.engine.pipeline import PBSPlan

# Exact attention probabilities held at once (elements): bounds recall's memory at any length.
_RECALL_CHUNK_ELEMENTS = 1 << 26


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: PBSPlan,
    *,
    scale: float | None = None,
    query_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mass of exact causal attention inside the computed blocks, per query head.

    For every query row, the exact softmax of ``q · kᵀ`` (original key order, token-level
    causal mask) is summed over the keys whose permuted block the plan computes for that
    row's query block; the result is averaged over rows. Computed in float32 in chunks of
    rows holding at most ``2**26`` probabilities, so memory is bounded at any length.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (original order), as given to the plan.
        plan: the plan to evaluate.
        query_blocks: optional long ``[n]``: evaluate only these query blocks (a subsample).

    Returns:
        float32 ``[B, Hq]`` in [0, 1].
    """
    if query_blocks is None:
        query_blocks = torch.arange(plan.layout.num_q_blocks, device=q.device)
    query_blocks = query_blocks.to(q.device)
    selected = plan.block_mask[:, :, query_blocks]
    return selection_recall(q, k, plan.key_order, selected, plan.layout, query_blocks, scale=scale)


def selection_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    key_order: torch.Tensor,
    selected: torch.Tensor,
    layout: BlockLayout,
    query_blocks: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention_recall` for a block selection of some query blocks only.

    Args:
        key_order: long ``[B, Hkv, Lk]``; selected: bool ``[B, Hq, n, nK]``, row ``i`` being the
            selection of query block ``query_blocks[i]`` (long ``[n]``).

    Returns:
        float32 ``[B, Hq]``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    bs = layout.block_size
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    # Permuted block of each original key: [B, Hkv, Lk].
    slot_of_key = torch.empty_like(key_order)
    slot_of_key.scatter_(-1, key_order, torch.arange(kv_len, device=q.device).expand_as(key_order))
    block_of_key = slot_of_key // layout.kv_block
    selected = selected.reshape(batch, kv_heads, group, selected.shape[2], -1)

    spans = [(i, b * bs, min((b + 1) * bs, q_len)) for i, b in enumerate(query_blocks.tolist())]
    rows = torch.cat([torch.arange(lo, hi, device=q.device) for _, lo, hi in spans])
    row_block = torch.cat([torch.full((hi - lo,), i, device=q.device) for i, lo, hi in spans])
    recalled = torch.zeros(batch, kv_heads, group, device=q.device)
    keys = torch.arange(kv_len, device=q.device)
    rows_per_chunk = max(1, _RECALL_CHUNK_ELEMENTS // (batch * q_heads * kv_len))
    for start in range(0, rows.numel(), rows_per_chunk):
        chunk = rows[start : start + rows_per_chunk]
        q_chunk = q[:, :, chunk].reshape(batch, kv_heads, group * chunk.numel(), dim)
        logits = torch.matmul(q_chunk.float(), k.float().transpose(-1, -2)) * scale
        logits = logits.view(batch, kv_heads, group, chunk.numel(), kv_len)
        visible = keys[None, :] <= (chunk + layout.q_offset)[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        # computed[b, h, g, r, key] = selected[b, h, g, block(r), block_of_key[b, h, key]]
        row_sel = selected[:, :, :, row_block[start : start + rows_per_chunk]]
        index = block_of_key[:, :, None, None, :].expand(-1, -1, group, chunk.numel(), -1)
        computed = torch.gather(row_sel, -1, index)
        recalled += (probs * computed).sum(dim=(-1, -2))
    return (recalled / rows.numel()).reshape(batch, q_heads)


def sample_query_blocks(num_q_blocks: int, count: int, seed: int = 0) -> torch.Tensor:
    """A reproducible subsample of query blocks (always including the last one)."""
    if count >= num_q_blocks:
        return torch.arange(num_q_blocks)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(num_q_blocks - 1, generator=gen)[: count - 1]
    return torch.cat([picked.sort().values, torch.tensor([num_q_blocks - 1])])

