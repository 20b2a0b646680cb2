"""Fused antidiagonal block scoring in Triton: strided GEMM + online softmax + block sums.

Computes the same function as :func:`flex_pbs.scoring.antidiagonal_block_scores` in one pass
over the keys, without the ``(L/S)²`` score matrix: each program owns the strided rows of one
GQA group (all query heads sharing a KV head, so every key tile is loaded once for the group)
and a few query blocks, walks the visible key tiles with an online softmax and writes, per row
and key block, ``log2 Σ exp2(logits)`` to a small scratch buffer; once the row's normaliser is
known, it sums ``exp2(block_lse - row_lse)`` over the rows of each query block. The grid is
persistent (about two programs per SM, longest query tiles first) so the scratch stays at
``programs × rows × nK`` floats instead of growing with the sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BlockLayout, block_min_position

_LOG2E = 1.4426950408889634
# Scaled fp8 values stay within ±240, below e4m3's 448 so that rounding cannot overflow.
_FP8_RANGE = tl.constexpr(240.0)


@triton.jit
def _cast_fp8_kernel(x_ptr, y_ptr, amax_ptr, numel, BLOCK: tl.constexpr):
    """``y = x * 240 / amax`` in float8 e4m3, one pass, with ``amax`` read on the device."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    scale = _FP8_RANGE / tl.maximum(tl.load(amax_ptr), 1e-6)
    x = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (x * scale).to(tl.float8e4nv), mask=offsets < numel)


def _abs_max(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max |x|`` as a float32 0-d tensor (into ``out`` if given): one reduction, no ``|x|``
    temporary."""
    if out is None:
        out = torch.empty((), dtype=torch.float32, device=x.device)
    return torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32, out=out)


def _to_fp8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Contiguous ``x`` scaled by ``240 / amax`` into float8 e4m3 (``amax``: one float32)."""
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    block = 4096
    _cast_fp8_kernel[(triton.cdiv(x.numel(), block),)](x, out, amax, x.numel(), BLOCK=block)
    return out


@triton.jit
def _antidiagonal_kernel(
    q_ptr, k_ptr, slot_first_ptr, out_ptr, scratch_ptr, amax_ptr,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_fb, stride_fh,
    stride_ob, stride_oh, stride_oq,
    q_len, kv_len, q_offset, n_q_blocks, n_kv_blocks, n_kv_heads, n_heads_total, n_q_tiles, n_programs,
    logit_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, Q_BLOCKS: tl.constexpr, ROWS: tl.constexpr,
    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_BLOCKS: tl.constexpr,
    SEGMENT_BLOCKS: tl.constexpr, SCRATCH_COLS: tl.constexpr, FP8: tl.constexpr,
):
    BLOCK: tl.constexpr = ROWS * STRIDE
    M: tl.constexpr = GROUP_PAD * Q_BLOCKS * ROWS
    N: tl.constexpr = TILE_BLOCKS * ROWS
    pid = tl.program_id(0)
    if FP8:  # undo the per-tensor scales of _cast_fp8_kernel (read on device: no host sync)
        logit_scale = logit_scale * (tl.maximum(tl.load(amax_ptr), 1e-6) / _FP8_RANGE)
        logit_scale = logit_scale * (tl.maximum(tl.load(amax_ptr + 1), 1e-6) / _FP8_RANGE)

    m_idx = tl.arange(0, M)
    g = m_idx // (Q_BLOCKS * ROWS)
    qb = (m_idx // ROWS) % Q_BLOCKS
    r = m_idx % ROWS
    n_idx = tl.arange(0, N)
    d_idx = tl.arange(0, HEAD_DIM)
    c_idx = tl.arange(0, TILE_BLOCKS)
    out_rows = tl.arange(0, GROUP_PAD * Q_BLOCKS)
    scratch_base = scratch_ptr + pid * M * SCRATCH_COLS

    # Work items run longest first: query tile (descending) major, (batch, KV head) minor.
    for item in tl.range(pid, n_q_tiles * n_heads_total, n_programs):
        tile = n_q_tiles - 1 - item // n_heads_total
        bh = item % n_heads_total
        b = bh // n_kv_heads
        hkv = bh % n_kv_heads
        first_block = tile * Q_BLOCKS

        row_start = (first_block + qb) * BLOCK + r * STRIDE
        row_valid = (g < GROUP) & (row_start < q_len) & (first_block + qb < n_q_blocks)
        row_last = tl.minimum(row_start + STRIDE - 1, q_len - 1) + q_offset
        q_rows = q_ptr + b * stride_qb + (hkv * GROUP + g) * stride_qh
        last_pos = tl.minimum((first_block + Q_BLOCKS) * BLOCK, q_len) - 1 + q_offset
        kv_end = tl.minimum(n_kv_blocks, (last_pos // (SEGMENT_BLOCKS * BLOCK) + 1) * SEGMENT_BLOCKS)
        k_head = k_ptr + b * stride_kb + hkv * stride_kh
        f_head = slot_first_ptr + b * stride_fb + hkv * stride_fh

        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        tl.debug_barrier()
        for j0 in range(0, kv_end, TILE_BLOCKS):
            slot = j0 * ROWS + n_idx
            acc = tl.zeros([M, N], tl.float32)
            for t in range(STRIDE):
                q_tok = row_start + STRIDE - 1 - t
                q_tile = tl.load(
                    q_rows[:, None] + q_tok[:, None] * stride_ql + d_idx[None, :],
                    mask=(row_valid & (q_tok < q_len))[:, None],
                    other=0.0,
                )
                k_tok = slot * STRIDE + t
                k_tile = tl.load(
                    k_head + k_tok[:, None] * stride_kl + d_idx[None, :],
                    mask=(k_tok < kv_len)[:, None],
                    other=0.0,
                )
                acc = tl.dot(q_tile, tl.trans(k_tile), acc)
            first = tl.load(f_head + slot, mask=slot < kv_end * ROWS, other=2**62)
            visible = first[None, :] <= row_last[:, None]
            logits = tl.where(visible, acc * logit_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(logits - m_safe[:, None])
            block_sums = tl.sum(tl.reshape(p, (M, TILE_BLOCKS, ROWS)), axis=2)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(block_sums, axis=1)
            m_i = m_new
            tl.store(
                scratch_base + m_idx[:, None] * SCRATCH_COLS + (j0 + c_idx)[None, :],
                m_safe[:, None] + tl.log2(block_sums),
            )
        row_lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i)
        tl.debug_barrier()
        for j0 in range(0, kv_end, TILE_BLOCKS):
            lse = tl.load(scratch_base + m_idx[:, None] * SCRATCH_COLS + (j0 + c_idx)[None, :])
            probs = tl.where(row_valid[:, None], tl.exp2(lse - row_lse[:, None]), 0.0)
            scores = tl.sum(tl.reshape(probs, (GROUP_PAD * Q_BLOCKS, ROWS, TILE_BLOCKS)), axis=1)
            out_g = out_rows // Q_BLOCKS
            out_q = first_block + out_rows % Q_BLOCKS
            cols = j0 + c_idx
            tl.store(
                out_ptr + b * stride_ob + (hkv * GROUP + out_g)[:, None] * stride_oh
                + out_q[:, None] * stride_oq + cols[None, :],
                scores,
                mask=((out_g < GROUP) & (out_q < n_q_blocks))[:, None] & (cols < kv_end)[None, :],
            )


def supports(q: torch.Tensor, block_size: int, stride: int) -> bool:
    """Whether the fused kernel handles this shape (power-of-two tiles, contiguous head dim)."""
    rows = block_size // stride
    dim = q.shape[-1]
    return rows >= 4 and rows & (rows - 1) == 0 and dim >= 16 and dim & (dim - 1) == 0


def antidiagonal_block_scores_fused(
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    stride: int,
    scale: float,
    *,
    tile_rows: int = 128,
    tile_slots: int = 128,
    num_warps: int = 8,
    num_stages: int | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """Fused equivalent of :func:`flex_pbs.scoring.antidiagonal_block_scores`.

    Args:
        q: ``[B, Hq, Lq, D]``; k_perm: ``[B, Hkv, Lk, D]`` (permuted layout);
        key_order: long ``[B, Hkv, Lk]``.
        tile_rows: strided query rows per program (the GQA group's heads × query blocks);
        tile_slots: key slots per inner step; num_warps, num_stages: Triton launch options
            (default stages: 3 in bf16, 5 in fp8, the fastest measured on an H100: NOTES.md).
        fp8: multiply in float8 e4m3 (Hopper): Q and K are converted once, in one pass each,
            with per-tensor scales to ``±240`` that the kernel reads on the device.

    Returns:
        float32 ``[B, Hq, nQ, nK]``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k_perm.shape[1], k_perm.shape[2]
    group = q_heads // kv_heads
    rows = layout.block_size // stride
    n_q, n_k = layout.num_q_blocks, layout.num_kv_blocks
    q, k_perm = q.contiguous(), k_perm.contiguous()
    slot_first = block_min_position(key_order, layout.block_size, stride)

    group_pad = triton.next_power_of_2(group)
    q_blocks = max(1, tile_rows // (group_pad * rows))
    tile_blocks = max(1, tile_slots // rows)
    n_q_tiles = triton.cdiv(n_q, q_blocks)
    n_items = n_q_tiles * batch * kv_heads
    scratch_cols = triton.cdiv(n_k, tile_blocks) * tile_blocks
    if q.is_cuda:
        programs = min(n_items, 2 * torch.cuda.get_device_properties(q.device).multi_processor_count)
    else:
        programs = min(n_items, 4)
    m = group_pad * q_blocks * rows
    scratch = torch.empty(programs, m, scratch_cols, device=q.device, dtype=torch.float32)
    out = torch.zeros(batch, q_heads, n_q, n_k, device=q.device, dtype=torch.float32)
    q_in, k_in, amax = q, k_perm, out  # amax is only read in fp8
    if fp8:
        amax = torch.empty(2, dtype=torch.float32, device=q.device)
        _abs_max(q, amax[0]), _abs_max(k_perm, amax[1])
        q_in, k_in = _to_fp8(q, amax[0:1]), _to_fp8(k_perm, amax[1:2])
    _antidiagonal_kernel[(programs,)](
        q_in, k_in, slot_first, out, scratch, amax,
        q_in.stride(0), q_in.stride(1), q_in.stride(2),
        k_in.stride(0), k_in.stride(1), k_in.stride(2),
        slot_first.stride(0), slot_first.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        q_len, kv_len, layout.q_offset, n_q, n_k, kv_heads, batch * kv_heads, n_q_tiles, programs,
        scale / stride * _LOG2E,
        GROUP=group, GROUP_PAD=group_pad, Q_BLOCKS=q_blocks, ROWS=rows, STRIDE=stride,
        HEAD_DIM=dim, TILE_BLOCKS=tile_blocks,
        SEGMENT_BLOCKS=layout.segment_size // layout.block_size, SCRATCH_COLS=scratch_cols, FP8=fp8,
        num_warps=num_warps, num_stages=num_stages or (5 if fp8 else 3),
    )
    return out

