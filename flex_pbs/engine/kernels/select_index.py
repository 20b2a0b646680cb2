"""Selection and BlockMask indices in one Triton pass: one program per query-block row.

The row's block scores stay in registers. Instead of sorting, the cut-off score is found by
bisection on the float bit pattern (exact for non-negative floats): a candidate block is kept
when the forced blocks' mass plus the mass of strictly higher-scoring candidates is still
below ``threshold`` of the row total, which is the sorted-prefix rule of
:func:`flex_pbs.engine.select.select_blocks` up to exact ties. A ``max_density`` budget is a
second bisection on the count. The kept blocks are compacted into FlexAttention's index
lists (partial: diagonal segment; full: the rest) with a prefix sum.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.layout import BlockLayout, block_min_position


@triton.jit
def _select_row_kernel(
    scores_ptr, block_first_ptr,
    selected_ptr, kv_num_ptr, full_num_ptr, idx_ptr, idx_row_stride, partial_width, full_width,
    n_q_blocks, n_kv_blocks, q_heads, group, q_len, q_offset,
    threshold, max_density, force_local,
    BLOCK: tl.constexpr, SEGMENT: tl.constexpr, SEGMENT_BLOCKS: tl.constexpr, COLS: tl.constexpr,
    BISECT_STEPS: tl.constexpr,
    KEEP_ALL: tl.constexpr, HAS_BUDGET: tl.constexpr, COUNT_FORCED: tl.constexpr, FORCE_SINK: tl.constexpr,
):
    row = tl.program_id(0)  # (b * Hq + h) * nQ + i
    i = row % n_q_blocks
    bh = row // n_q_blocks
    b = bh // q_heads
    hkv = (bh % q_heads) // group
    cols = tl.arange(0, COLS)
    valid = cols < n_kv_blocks

    first_pos = q_offset + i * BLOCK
    last_pos = q_offset + tl.minimum((i + 1) * BLOCK, q_len) - 1
    # BLOCK: tokens per query block; SEGMENT tokens = SEGMENT_BLOCKS key blocks.
    diag_start = (first_pos // SEGMENT) * SEGMENT_BLOCKS
    diag_stop = (last_pos // SEGMENT + 1) * SEGMENT_BLOCKS
    block_first = tl.load(block_first_ptr + (b * (q_heads // group) + hkv) * n_kv_blocks + cols, mask=valid, other=2**62)
    causal = valid & (block_first <= last_pos)
    diagonal = causal & (cols >= diag_start) & (cols < diag_stop)
    forced = diagonal | (causal & (cols < diag_start) & (cols >= diag_start - force_local))
    if FORCE_SINK:  # the block holding original token 0 is the one whose smallest position is 0
        forced = forced | (causal & (block_first == 0))

    s = tl.load(scores_ptr + row * n_kv_blocks + cols, mask=valid, other=0.0)
    s = tl.where(causal, tl.maximum(s, 0.0), 0.0)
    candidate = causal & ~forced
    v = tl.where(candidate, s, 0.0)
    if COUNT_FORCED:
        need = threshold * tl.sum(s, axis=0) - tl.sum(tl.where(forced, s, 0.0), axis=0)
    else:
        need = threshold * tl.sum(v, axis=0)

    # Smallest bit pattern t with mass(v > t) < need; kept: candidates with v >= t.
    lo = tl.full([], -1, tl.int32)
    hi = tl.max(v.to(tl.int32, bitcast=True), axis=0) + 1
    for _ in range(BISECT_STEPS):
        mid = lo + (hi - lo) // 2
        above = tl.sum(tl.where(v > mid.to(tl.float32, bitcast=True), v, 0.0), axis=0)
        ok = above < need
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    if KEEP_ALL:
        keep = candidate
    else:
        keep = candidate & ((v.to(tl.int32, bitcast=True) >= hi).to(tl.int32) * (need > 0).to(tl.int32) > 0)

    if HAS_BUDGET:  # budget: at most ceil(max_density * causal) blocks, forced first
        allowed = max_density * tl.sum(causal.to(tl.float32), axis=0)
        allowed_ceil = allowed.to(tl.int32) + (allowed > allowed.to(tl.int32).to(tl.float32)).to(tl.int32)
        budget = (allowed_ceil - tl.sum(forced.to(tl.int32), axis=0)).to(tl.float32)
        lo = tl.full([], -1, tl.int32)
        hi = tl.max(v.to(tl.int32, bitcast=True), axis=0) + 1
        for _ in range(BISECT_STEPS):
            mid = lo + (hi - lo) // 2
            count = tl.sum((keep & (v.to(tl.int32, bitcast=True) >= mid)).to(tl.float32), axis=0)
            fits = count <= budget
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid)
        keep = keep & (v.to(tl.int32, bitcast=True) >= hi)

    selected = forced | keep
    tl.store(selected_ptr + row * n_kv_blocks + cols, selected.to(tl.int8), mask=valid)
    partial = selected & diagonal
    full = selected & ~diagonal
    partial_at = tl.cumsum(partial.to(tl.int32), axis=0) - 1
    full_at = tl.cumsum(full.to(tl.int32), axis=0) - 1
    # One row holds both lists: partial indices first, full indices from `partial_width` on.
    tl.store(idx_ptr + row * idx_row_stride + partial_at, cols, mask=partial)
    tl.store(idx_ptr + row * idx_row_stride + partial_width + full_at, cols, mask=full & (full_at < full_width))
    tl.store(kv_num_ptr + row, tl.sum(partial.to(tl.int32), axis=0))
    tl.store(full_num_ptr + row, tl.sum(full.to(tl.int32), axis=0))


def index_list_width(n_kv_blocks: int, partial_width: int, config: PBSConfig) -> int:
    """Entries per index list row: ``n_kv_blocks``, or under a ``max_density`` budget the most
    full blocks a row can keep (the budget's ``ceil(max_density * n_kv_blocks)``, or the forced
    sink and local window when they exceed it, plus one for rounding), and at least
    ``partial_width`` (the partial list shares the width), never more than ``n_kv_blocks``."""
    if config.max_density is None:
        return n_kv_blocks
    kept = math.ceil(config.max_density * n_kv_blocks) + config.force_local_blocks + 2
    return min(n_kv_blocks, max(partial_width, kept))


def select_and_index_fused(
    scores: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    config: PBSConfig,
    *,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fused equivalent of the select stage plus the BlockMask index construction.

    Args:
        scores: float32 ``[B, Hq, nQ, nK]``; key_order: long ``[B, Hkv, Lk]``.
        num_warps: warps per row (Triton launch option). Default: 1 with a ``max_density``
            budget (64 bisection steps, each a row reduction: one warp reduces without
            barriers), 4 without; on an H100 at 128K, 0.71 vs 0.91 ms and 0.55 vs 0.60 ms.

    Returns:
        ``(selected bool [B, Hq, nQ, nK], (kv_num, kv_indices, full_num, full_indices))``
        with int32 ``[B, Hq, nQ]`` counts and ``[B, Hq, nQ, N]`` indices. The two index lists
        are overlapping views of one ``[B, Hq, nQ, W + N]`` buffer (``W`` = the most partial
        blocks a row can have): half the memory of two lists, which dominate the peak at 128K.
        ``N`` is ``nK``, or with a ``max_density`` budget the most blocks a row can keep
        (:func:`index_list_width`), so the lists shrink with the budget.
    """
    batch, q_heads, n_q, n_k = scores.shape
    group = q_heads // key_order.shape[1]
    scores = scores.contiguous()
    block_first = block_min_position(key_order, layout.kv_block).contiguous()
    selected = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    segment_blocks = layout.segment_size // layout.kv_block
    partial_width = 2 * segment_blocks  # a query block overlaps at most two segments
    width = index_list_width(n_k, partial_width, config)
    lists = torch.zeros(batch, q_heads, n_q, partial_width + width, dtype=torch.int32, device=scores.device)
    kv_num = torch.empty(batch, q_heads, n_q, dtype=torch.int32, device=scores.device)
    full_num = torch.empty_like(kv_num)
    _select_row_kernel[(batch * q_heads * n_q,)](
        scores, block_first,
        selected, kv_num, full_num, lists, lists.stride(2), partial_width, width,
        n_q, n_k, q_heads, group, layout.q_len, layout.q_offset,
        float(config.threshold), float(config.max_density or 1.0), config.force_local_blocks,
        BLOCK=layout.block_size, SEGMENT=layout.segment_size, SEGMENT_BLOCKS=segment_blocks,
        COLS=triton.next_power_of_2(n_k), BISECT_STEPS=32,
        KEEP_ALL=config.threshold >= 1.0, HAS_BUDGET=config.max_density is not None,
        COUNT_FORCED=config.threshold_counts_forced, FORCE_SINK=config.force_sink,
        num_warps=num_warps or (1 if config.max_density is not None else 4),
    )
    kv_idx, full_idx = lists[..., :width], lists[..., partial_width:]
    return selected.view(torch.bool), (kv_num, kv_idx, full_num, full_idx)
