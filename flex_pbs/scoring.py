"""Stage 2, score: estimate the attention mass of every (query block, key block) pair.

Both scorers work on the permuted key layout and return float32 ``[B, Hq, nQ, nK]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import PBSConfig
from .layout import PAST_ANY_QUERY, BlockLayout, block_min_position, cdiv


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
    pooled_k = _block_means(k_perm, layout.block_size)
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
) -> torch.Tensor:
    """XAttention's estimate: softmax over strided antidiagonal sums, summed into blocks.

    Strided query row ``r`` and key slot ``j`` score ``sum_t q[r*S + S-1-t] · k[j*S + t]``
    scaled by ``scale / S``. A slot is visible to a row when its earliest original key
    precedes the row's last query (exactly XAttention's stride-level causal mask when keys are
    not permuted). The softmax runs in float32 over all visible slots of the row; block scores
    sum the ``(block/S)²`` entries of each tile, so a full row of blocks sums to the number of
    strided rows in the query block.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k_perm: ``[B, Hkv, Lk, D]`` in the permuted layout.
        key_order: long ``[B, Hkv, Lk]``, original position of each key slot.
        chunk_blocks: query blocks scored at once (memory: ``chunk * block/S * Lk/S`` floats
            per head).
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_perm.shape[1]
    group = q_heads // kv_heads
    bs, n_q, n_k = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    rows_per_block = bs // stride

    # [B, Hkv, G, R, S*D]: each strided query row with its S queries in reverse order.
    q_rows = _pad_to(q, n_q * bs).reshape(batch, kv_heads, group, n_q * rows_per_block, stride, dim)
    q_rows = q_rows.flip(-2).flatten(-2)
    # [B, Hkv, S*D, K]: each key slot with its S keys in order.
    k_slots = _pad_to(k_perm, n_k * bs).reshape(batch, kv_heads, n_k * rows_per_block, stride * dim)
    k_slots = k_slots.transpose(-1, -2)
    slot_first = block_min_position(key_order, bs, stride)[:, :, None, None, :]
    row_start = torch.arange(n_q * rows_per_block, device=q.device) * stride
    row_last = torch.clamp(row_start + stride - 1, max=q_len - 1) + layout.q_offset
    row_valid = row_start < q_len

    scores = []
    for blocks in torch.arange(n_q, device=q.device).split(chunk_blocks):
        rows = (blocks[:, None] * rows_per_block + torch.arange(rows_per_block, device=q.device)).flatten()
        n_rows = rows.numel()
        chunk_q = q_rows[:, :, :, rows].flatten(2, 3)
        logits = torch.matmul(chunk_q, k_slots)
        logits = logits.float().view(batch, kv_heads, group, n_rows, -1) * (scale / stride)
        visible = slot_first <= row_last[rows][:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs * row_valid[rows][:, None]
        tiles = probs.view(batch, kv_heads, group, n_rows // rows_per_block, rows_per_block, n_k, rows_per_block)
        scores.append(tiles.sum(dim=(-3, -1)))
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
    k_blocks = _pad_to(k_perm.float(), n_k * bs)
    key_pos = F.pad(key_order, (0, n_k * bs - layout.kv_len), value=PAST_ANY_QUERY)[:, :, None]
    scores = []
    for block in range(n_q):
        rows = torch.arange(block * bs, min((block + 1) * bs, q_len), device=q.device)
        q_block = q[:, :, rows].float().reshape(batch, kv_heads, group * rows.numel(), dim)
        logits = torch.matmul(q_block, k_blocks.transpose(-1, -2)) * scale
        visible = key_pos <= (rows + layout.q_offset).repeat(group)[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs.view(batch, kv_heads, group, rows.numel(), n_k, bs).sum(dim=(3, 5))
        scores.append(probs)
    return torch.stack(scores, dim=3).reshape(batch, q_heads, n_q, n_k)


def estimate_block_scores(
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    config: PBSConfig,
    scale: float,
) -> torch.Tensor:
    """The configured scorer in plain torch: float32 ``[B, Hq, nQ, nK]``."""
    if config.scoring == "antidiagonal":
        return antidiagonal_block_scores(q, k_perm, key_order, layout, config.stride, scale, config.scoring_chunk)
    if config.scoring == "mean":
        return mean_pool_block_scores(q, k_perm, layout, scale)
    return oracle_block_scores(q, k_perm, key_order, layout, scale)
