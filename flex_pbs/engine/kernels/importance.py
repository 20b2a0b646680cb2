"""Key importance in Triton: the last query block's attention, averaged per key, in two passes.

Pass 1 computes each query row's log-sum-exp over its visible keys (split over key ranges for
parallelism, merged in torch); pass 2 streams the key tiles again and sums ``exp(s - lse)``
down the rows. The ``[rows, L]`` probability matrix never exists: memory is O(L), and the
work is two thin GEMMs (rows = GQA group × block size, 512 for Llama-3-8B shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flex_pbs.engine.kernels import shared_memory

_LOG2E = 1.4426950408889634
_ROWS = 64
_KEYS = 64
_KEYS_PER_SPLIT = 8192


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, part_max_ptr, part_sum_ptr,
    stride_qbh, stride_qr, stride_kbh, stride_kl,
    n_rows, kv_len, rows_per_head, first_pos, keys_per_split, scale_log2,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
):
    bh = tl.program_id(0)
    row_tile = tl.program_id(1)
    split = tl.program_id(2)
    rows = row_tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_rows
    pos = first_pos + rows % rows_per_head
    q = tl.load(q_ptr + bh * stride_qbh + rows[:, None] * stride_qr + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, kv_len)
    for k0 in range(start, stop, KEYS):
        keys = k0 + tl.arange(0, KEYS)
        k = tl.load(k_ptr + bh * stride_kbh + keys[:, None] * stride_kl + dims[None, :], mask=(keys < stop)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where((keys[None, :] <= pos[:, None]) & (keys[None, :] < stop), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (bh * tl.num_programs(2) + split) * n_rows + rows
    tl.store(part_max_ptr + out, m_i, mask=row_ok)
    tl.store(part_sum_ptr + out, l_i, mask=row_ok)


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    stride_qbh, stride_qr, stride_kbh, stride_kl,
    n_rows, kv_len, rows_per_head, first_pos, scale_log2,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
):
    bh = tl.program_id(0)
    keys = tl.program_id(1) * KEYS + tl.arange(0, KEYS)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < kv_len
    k = tl.load(k_ptr + bh * stride_kbh + keys[:, None] * stride_kl + dims[None, :], mask=key_ok[:, None], other=0.0)
    acc = tl.zeros([KEYS], tl.float32)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        q = tl.load(q_ptr + bh * stride_qbh + rows[:, None] * stride_qr + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh * n_rows + rows, mask=row_ok, other=float("inf"))
        pos = first_pos + rows % rows_per_head
        s = tl.dot(q, tl.trans(k)) * scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where((keys[None, :] <= pos[:, None]) & row_ok[:, None] & key_ok[None, :], p, 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + bh * kv_len + keys, acc / n_rows, mask=key_ok)


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels handle this head dim: a power of two (as ``tl.arange`` needs) whose
    query and key tiles fit shared memory in Triton's three default stages (fp32 at head_dim
    256 does not: torch computes it)."""
    dim = q.shape[-1]
    needed = (_ROWS + _KEYS) * dim * q.element_size() * 3
    return dim >= 16 and dim & (dim - 1) == 0 and needed <= shared_memory(q.device) - 4096


def key_importance_fused(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, q_offset: int = 0
) -> torch.Tensor:
    """Fused equivalent of :func:`flex_pbs.engine.permute.key_importance`: float32 ``[B, Hkv, Lk]``."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    n_last = min(block_size, q_len)
    # Rows of one KV head: its G query heads × the last n_last queries; [B*Hkv, R, D].
    last = q[:, :, q_len - n_last :].reshape(batch * kv_heads, group * n_last, dim).contiguous()
    keys = k.reshape(batch * kv_heads, kv_len, dim)
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    n_rows = group * n_last
    first_pos = q_offset + q_len - n_last
    scale_log2 = scale * _LOG2E
    n_splits = triton.cdiv(kv_len, _KEYS_PER_SPLIT)
    part_max = torch.empty(batch * kv_heads, n_splits, n_rows, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    grid = (batch * kv_heads, triton.cdiv(n_rows, _ROWS), n_splits)
    _row_stats_kernel[grid](
        last, keys, part_max, part_sum,
        last.stride(0), last.stride(1), keys.stride(0), keys.stride(1),
        n_rows, kv_len, n_last, first_pos, _KEYS_PER_SPLIT, scale_log2,
        HEAD_DIM=dim, ROWS=_ROWS, KEYS=_KEYS,
    )
    top = part_max.amax(dim=1, keepdim=True)
    top_safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    lse = (top_safe + torch.log2((part_sum * torch.exp2(part_max - top_safe)).sum(dim=1, keepdim=True)))
    lse = lse.squeeze(1).contiguous()
    out = torch.empty(batch * kv_heads, kv_len, device=q.device, dtype=torch.float32)
    _column_sums_kernel[(batch * kv_heads, triton.cdiv(kv_len, _KEYS))](
        last, keys, lse, out,
        last.stride(0), last.stride(1), keys.stride(0), keys.stride(1),
        n_rows, kv_len, n_last, first_pos, scale_log2,
        HEAD_DIM=dim, ROWS=_ROWS, KEYS=_KEYS,
    )
    return out.view(batch, kv_heads, kv_len)
