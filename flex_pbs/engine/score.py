"""Stage 2, score: estimate the attention mass of every (query block, key block) pair.

Every scorer works on the permuted key layout and returns float32 ``[B, Hq, nQ, nK]``;
:data:`SCORERS` maps ``PBSConfig.scoring`` to one, and ``score_stage`` runs it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.kernels import use_fused
from flex_pbs.engine.layout import PAST_ANY_QUERY, BlockLayout, block_min_position, cdiv


def _wide_enough(x: torch.Tensor) -> torch.Tensor:
    """float16 products overflow past 65504 (raw q·k sums of large activations do); bf16 and
    fp32 share fp32's range. Score float16 inputs in float32."""
    return x.float() if x.dtype == torch.float16 else x


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad ``[..., L, D]`` along L to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of tokens, ignoring padding: ``[B, H, L, D]`` -> ``[B, H, nBlocks, D]``."""
    length = x.shape[-2]
    blocks = cdiv(length, block_size)
    sums = _pad_to(x.float(), blocks * block_size).unflatten(-2, (blocks, block_size)).sum(dim=-2)
    counts = torch.clamp(length - torch.arange(blocks, device=x.device) * block_size, max=block_size)
    return sums / counts[:, None]


def mean_pool_block_scores(
    q: torch.Tensor, k_perm: torch.Tensor, layout: BlockLayout, scale: float
) -> torch.Tensor:
    """The PBS paper's estimate: softmax of mean-pooled Q · mean-pooled K.

    The softmax of each query-block row runs only over key blocks in earlier segments (the
    diagonal segment is always computed and stays outside it); other entries are 0, and rows
    with no earlier segment are all 0.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k_perm: ``[B, Hkv, Lk, D]`` in the permuted layout.
    """
    batch, q_heads = q.shape[:2]
    kv_heads = k_perm.shape[1]
    pooled_q = _block_means(q, layout.block_size).reshape(batch, kv_heads, -1, q.shape[-1])
    pooled_k = _block_means(k_perm, layout.kv_block)
    logits = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale
    logits = logits.reshape(batch, q_heads, layout.num_q_blocks, layout.num_kv_blocks)
    eligible = layout.earlier_segment_blocks(q.device)
    probs = torch.softmax(logits.masked_fill(~eligible, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0)


def antidiagonal_block_scores(
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    stride: int,
    scale: float,
    chunk_blocks: int = 16,
    peak_weight: float = 0.0,
) -> torch.Tensor:
    """XAttention's estimate: softmax over strided antidiagonal sums, summed into blocks;
    optionally mixed with the softmax of each antidiagonal's largest term.

    Strided query row ``r`` and key slot ``j`` pair the ``S`` products
    ``scale · q[r*S + S-1-t] · k[j*S + t]`` (``t < S``). The mean estimate takes their mean as
    the logit (XAttention); the peak estimate takes their maximum: the mean dilutes one strong
    pair (a copied phrase, a retrieved fact) among ``S``, the maximum keeps it at full height.
    Each row's softmax runs in float32 over its visible slots (a slot is visible when its
    earliest original key precedes the row's last query: XAttention's stride-level causal mask
    when keys are not permuted); block scores sum the ``(block/S) × (key block/S)`` entries of
    each tile, so a full row of blocks sums to the number of strided rows in the query block.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k_perm: ``[B, Hkv, Lk, D]`` in the permuted layout.
        key_order: long ``[B, Hkv, Lk]``, original position of each key slot.
        chunk_blocks: query blocks scored at once (memory: ``chunk * block/S * Lk/S`` floats
            per head, twice that with a peak estimate).
        peak_weight: ``w`` in ``(1 - w) · mean estimate + w · peak estimate``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_perm.shape[1]
    group = q_heads // kv_heads
    bs, n_q, n_k = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    rows_per_block, slots_per_block = bs // stride, layout.kv_block // stride
    q, k_perm = _wide_enough(q), _wide_enough(k_perm)

    # [B, Hkv, G, R, S, D]: each strided query row with its S queries in reverse order.
    q_rows = _pad_to(q, n_q * bs).reshape(batch, kv_heads, group, n_q * rows_per_block, stride, dim).flip(-2)
    # [B, Hkv, K, S, D]: each key slot with its S keys in order.
    k_slots = _pad_to(k_perm, n_k * layout.kv_block).reshape(batch, kv_heads, n_k * slots_per_block, stride, dim)
    slot_first = block_min_position(key_order, layout.kv_block, stride)[:, :, None, None, :]
    row_start = torch.arange(n_q * rows_per_block, device=q.device) * stride
    row_last = torch.clamp(row_start + stride - 1, max=q_len - 1) + layout.q_offset
    row_valid = row_start < q_len

    def block_sums(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Row softmax over visible slots, summed into ``[B, Hkv, G, n, nK]`` block scores."""
        visible = slot_first <= row_last[rows][:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs * row_valid[rows][:, None]
        n_rows = rows.numel()
        tiles = probs.view(batch, kv_heads, group, n_rows // rows_per_block, rows_per_block, n_k, slots_per_block)
        return tiles.sum(dim=(-3, -1))

    scores = []
    for blocks in torch.arange(n_q, device=q.device).split(chunk_blocks):
        rows = (blocks[:, None] * rows_per_block + torch.arange(rows_per_block, device=q.device)).flatten()
        shape = (batch, kv_heads, group, rows.numel(), -1)
        chunk_q = q_rows[:, :, :, rows].flatten(2, 3)  # [B, Hkv, G*n, S, D]
        if peak_weight == 0.0:  # one GEMM over the S·D concatenation sums the S products
            logits = torch.matmul(chunk_q.flatten(-2), k_slots.flatten(-2).transpose(-1, -2))
            scores.append(block_sums(logits.float().view(shape) * (scale / stride), rows))
            continue
        total = peak = None
        for t in range(stride):
            term = torch.matmul(chunk_q[..., t, :], k_slots[..., t, :].transpose(-1, -2)).float()
            total = term if total is None else total + term
            peak = term if peak is None else torch.maximum(peak, term)
        mean_scores = block_sums(total.view(shape) * (scale / stride), rows)
        peak_scores = block_sums(peak.view(shape) * scale, rows)
        scores.append(torch.lerp(mean_scores, peak_scores, peak_weight))
    return torch.cat(scores, dim=3).reshape(batch, q_heads, n_q, n_k)


def oracle_block_scores(
    q: torch.Tensor, k_perm: torch.Tensor, key_order: torch.Tensor, layout: BlockLayout, scale: float
) -> torch.Tensor:
    """The exact attention mass of every block (an O(L²) upper bound for analysis, not a
    sparse method): float32 ``[B, Hq, nQ, nK]``, each row summing to its number of queries."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_perm.shape[1]
    group = q_heads // kv_heads
    bs, n_q, n_k = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    k_blocks = _pad_to(k_perm.float(), n_k * layout.kv_block)
    key_pos = F.pad(key_order, (0, n_k * layout.kv_block - layout.kv_len), value=PAST_ANY_QUERY)[:, :, None]
    scores = []
    for block in range(n_q):
        rows = torch.arange(block * bs, min((block + 1) * bs, q_len), device=q.device)
        q_block = q[:, :, rows].float().reshape(batch, kv_heads, group * rows.numel(), dim)
        logits = torch.matmul(q_block, k_blocks.transpose(-1, -2)) * scale
        visible = key_pos <= (rows + layout.q_offset).repeat(group)[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs.view(batch, kv_heads, group, rows.numel(), n_k, layout.kv_block).sum(dim=(3, 5))
        scores.append(probs)
    return torch.stack(scores, dim=3).reshape(batch, q_heads, n_q, n_k)


Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockLayout, PBSConfig, float], torch.Tensor]


def _antidiagonal(q, k_perm, key_order, layout, config, scale):
    if use_fused(q, config.backend):
        from flex_pbs.engine.kernels import antidiagonal

        if antidiagonal.supports(q, layout, config.stride, fp8=config.scoring_fp8, peak=config.peak_weight > 0):
            return antidiagonal.antidiagonal_block_scores_fused(
                q, k_perm, key_order, layout, config.stride, scale,
                fp8=config.scoring_fp8, peak_weight=config.peak_weight,
            )
    return antidiagonal_block_scores(
        q, k_perm, key_order, layout, config.stride, scale, config.scoring_chunk, config.peak_weight
    )


# ``PBSConfig.scoring`` -> scorer ``(q, k_perm, key_order, layout, config, scale)``; the
# antidiagonal one runs the fused kernel where it applies.
SCORERS: dict[str, Scorer] = {
    "antidiagonal": _antidiagonal,
    "mean": lambda q, k_perm, key_order, layout, config, scale: mean_pool_block_scores(q, k_perm, layout, scale),
    "oracle": lambda q, k_perm, key_order, layout, config, scale: oracle_block_scores(q, k_perm, key_order, layout, scale),
}


def score_stage(
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    config: PBSConfig,
    scale: float,
) -> torch.Tensor:
    """Stage 2: the configured scorer's float32 block scores ``[B, Hq, nQ, nK]``."""
    return SCORERS[config.scoring](q, k_perm, key_order, layout, config, scale)
