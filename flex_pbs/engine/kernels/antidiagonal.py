"""Fused antidiagonal block scoring in Triton: strided GEMM + online softmax + block sums.

Computes the same function as :func:`flex_pbs.engine.score.antidiagonal_block_scores` in one pass
over the keys, without the ``(L/S)²`` score matrix. Viewed as ``[L/S, S·D]`` (each row the
``S`` consecutive tokens of one stride slot), Q and K make the antidiagonal sum a plain GEMM
whose inner dimension runs over the slot's tokens backwards for Q: chunk ``t`` of a key row
pairs with chunk ``S-1-t`` of a query row. Both are read with tensor descriptors (TMA on
Hopper), one ``[rows, D]`` chunk at a time, in a single flattened loop over (key tile, chunk)
so that loads stay pipelined across key tiles. Each program owns 128 strided query rows of one
head, keeps an online softmax per row, writes ``log2 Σ exp2(logits)`` per row and key block to
a small scratch buffer, and once the row's normaliser is known sums ``exp2(block_lse - row_lse)``
over the rows of each query block. The grid is persistent (one program per SM, longest query
tiles first), so the scratch is ``programs × rows × nK`` floats whatever the length. With a
peak estimate the chunk products are kept apart (a fresh MMA per chunk, added into the sum and
max-reduced into a second tile) and a second online softmax runs beside the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flex_pbs.engine.kernels import shared_memory
from flex_pbs.engine.layout import BlockLayout, block_min_position

_LOG2E = 1.4426950408889634
# Scaled fp8 values stay within ±240, below e4m3's 448 so that rounding cannot overflow.
_FP8_RANGE = tl.constexpr(240.0)
_INT32_MAX = 2**31 - 1
_NOT_VISIBLE_POSITION = tl.constexpr(_INT32_MAX)  # int32 slot position past any query
_TILE_ROWS = 128  # strided query rows per program


@triton.jit
def _cast_fp8_kernel(
    x_ptr, y_ptr, amax_ptr, stride_b, stride_h, stride_l, heads, length, padded_length,
    ROWS: tl.constexpr, DIM: tl.constexpr,
):
    """``y[b, h, l] = x[b, h, l] * 240 / amax`` in float8 e4m3 (``amax`` read on the device),
    zero for ``length <= l < padded_length``; ``x`` strided, ``y`` contiguous."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, DIM)
    scale = _FP8_RANGE / tl.maximum(tl.load(amax_ptr), 1e-6)
    source = x_ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    x = tl.load(
        source + rows.to(tl.int64)[:, None] * stride_l + cols[None, :],
        mask=(rows < length)[:, None],
        other=0.0,
    ).to(tl.float32)
    target = y_ptr + (bh.to(tl.int64) * padded_length + rows)[:, None] * DIM + cols[None, :]
    tl.store(target, (x * scale).to(tl.float8e4nv), mask=(rows < padded_length)[:, None])


@triton.jit
def _cast_fp8_slots_kernel(
    x_ptr, y_ptr, descale_ptr, stride_b, stride_h, stride_l, heads, length, slots_per_head,
    SLOTS: tl.constexpr, STRIDE: tl.constexpr, DIM: tl.constexpr, COLS: tl.constexpr,
):
    """Each stride slot (``STRIDE`` consecutive tokens, one row of the ``[L'/S, S·D]`` view)
    scaled by ``240 / its own max |x|`` into float8 e4m3, ``max |x| / 240`` into ``descale``;
    tokens ``>= length`` are zero. One pass: no separate max over the tensor."""
    bh = tl.program_id(1)
    slots = tl.program_id(0) * SLOTS + tl.arange(0, SLOTS)
    cols = tl.arange(0, COLS)  # the slot's S·D values, padded to a power of two
    in_slot = cols[None, :] < STRIDE * DIM
    tokens = slots[:, None] * STRIDE + cols[None, :] // DIM
    source = x_ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    x = tl.load(
        source + tokens.to(tl.int64) * stride_l + cols[None, :] % DIM, mask=in_slot & (tokens < length), other=0.0
    ).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-6)
    scale = _FP8_RANGE / amax
    rows = bh.to(tl.int64) * slots_per_head + slots
    in_head = slots < slots_per_head
    tl.store(
        y_ptr + rows[:, None] * (STRIDE * DIM) + cols[None, :],
        (x * scale[:, None]).to(tl.float8e4nv),
        mask=in_head[:, None] & in_slot,
    )
    tl.store(descale_ptr + rows, amax / _FP8_RANGE, mask=in_head)


def _to_fp8_slots(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, L, D]`` (any strides, contiguous last dim) as a contiguous float8 e4m3
    ``[B, H, L', D]`` (``L'`` rounded up to ``stride`` with zero rows), each stride slot scaled
    to ``±240`` on its own, and the float32 ``[B, H, L'/stride]`` factors that undo the scales."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, length, dim = x.shape
    slots = -(-length // stride)
    out = torch.empty(batch, heads, slots * stride, dim, dtype=torch.float8_e4m3fn, device=x.device)
    descale = torch.empty(batch, heads, slots, dtype=torch.float32, device=x.device)
    cols = triton.next_power_of_2(stride * dim)
    per_program = max(1, 4096 // cols)
    grid = (triton.cdiv(slots, per_program), batch * heads)
    _cast_fp8_slots_kernel[grid](
        x, out, descale, x.stride(0), x.stride(1), x.stride(2), heads, length, slots,
        SLOTS=per_program, STRIDE=stride, DIM=dim, COLS=cols,
    )
    return out, descale


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a float32 0-d tensor: one reduction, no ``|x|`` temporary."""
    return torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)


def _to_fp8(x: torch.Tensor, amax: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """``x [B, H, L, D]`` (any strides, contiguous last dim) scaled by ``240 / amax`` into a
    contiguous float8 e4m3 ``[B, H, L', D]``, ``L'`` rounded up to ``multiple`` with zero rows
    (``amax``: one float32 on the device)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, length, dim = x.shape
    padded = -(-length // multiple) * multiple
    out = torch.empty(batch, heads, padded, dim, dtype=torch.float8_e4m3fn, device=x.device)
    rows = max(1, 4096 // dim)
    grid = (triton.cdiv(padded, rows), batch * heads)
    _cast_fp8_kernel[grid](
        x, out, amax, x.stride(0), x.stride(1), x.stride(2), heads, length, padded, ROWS=rows, DIM=dim
    )
    return out


def _padded_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Contiguous, 16-byte aligned ``x [B, H, L, D]`` (what a tensor descriptor needs) with
    ``L`` rounded up to ``multiple`` by zero rows."""
    pad = -x.shape[2] % multiple
    if pad:
        return F.pad(x, (0, 0, 0, pad))
    return x if x.is_contiguous() and x.data_ptr() % 16 == 0 else x.clone(memory_format=torch.contiguous_format)


@triton.jit
def _online_block_softmax(
    logits, m_i, l_i, block_lse_ptrs, M: tl.constexpr, TILE_BLOCKS: tl.constexpr, K_ROWS: tl.constexpr
):
    """One key tile of a row-wise online softmax over log2-scaled ``logits [M, TILE_BLOCKS·K_ROWS]``:
    stores ``log2 Σ exp2`` of each key block of the tile at ``block_lse_ptrs [M, TILE_BLOCKS]``
    and returns the updated running max and sum ``(m_i, l_i)``, both ``[M]``."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    block_sums = tl.sum(tl.reshape(tl.exp2(logits - m_safe[:, None]), (M, TILE_BLOCKS, K_ROWS)), axis=2)
    tl.store(block_lse_ptrs, m_safe[:, None] + tl.log2(block_sums))
    return m_new, l_i * tl.exp2(m_i - m_safe) + tl.sum(block_sums, axis=1)


@triton.jit
def _log2_total(m_i, l_i):
    """``log2`` of a row's softmax normaliser from its running max and sum (0 max for empty rows)."""
    return tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i)


@triton.jit
def _antidiagonal_kernel(
    q_desc, k_desc, slot_first_ptr, out_ptr, scratch_ptr, peak_scratch_ptr, q_descale_ptr, k_amax_ptr,
    stride_fb, stride_fh,
    stride_ob, stride_oh, stride_oq,
    q_len, q_offset, n_q_blocks, n_kv_blocks, q_heads, kv_heads, n_q_tiles, heads_total, n_programs,
    q_rows_per_head, k_rows_per_head,
    logit_scale, peak_weight,
    Q_BLOCKS: tl.constexpr, ROWS: tl.constexpr, K_ROWS: tl.constexpr, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, SEGMENT_BLOCKS: tl.constexpr, SCRATCH_COLS: tl.constexpr,
    FP8: tl.constexpr, PRECISION: tl.constexpr, PEAK: tl.constexpr,
):
    BLOCK: tl.constexpr = ROWS * STRIDE  # tokens per query block
    SEGMENT: tl.constexpr = SEGMENT_BLOCKS * K_ROWS * STRIDE  # tokens per segment
    M: tl.constexpr = Q_BLOCKS * ROWS
    N: tl.constexpr = TILE_BLOCKS * K_ROWS
    pid = tl.program_id(0)
    if FP8:  # undo K's per-tensor scale (read on the device: no host sync); Q's are per row
        logit_scale = logit_scale * (tl.maximum(tl.load(k_amax_ptr), 1e-6) / _FP8_RANGE)

    m_idx = tl.arange(0, M)
    n_idx = tl.arange(0, N)
    c_idx = tl.arange(0, TILE_BLOCKS)
    out_blocks = tl.arange(0, Q_BLOCKS)
    scratch_base = scratch_ptr + pid * M * SCRATCH_COLS
    peak_base = peak_scratch_ptr + pid * M * SCRATCH_COLS

    # Work items run longest first: query tile (descending) major, (batch, head) minor, so the
    # query heads sharing a KV head run together and read its key tiles from L2.
    for item in tl.range(pid, n_q_tiles * heads_total, n_programs):
        tile = n_q_tiles - 1 - item // heads_total
        bh = item % heads_total
        b = bh // q_heads
        h = bh % q_heads
        h_kv = h // (q_heads // kv_heads)
        first_block = tile * Q_BLOCKS

        row_start = first_block * BLOCK + m_idx * STRIDE
        row_valid = row_start < q_len
        row_last = tl.minimum(row_start + STRIDE - 1, q_len - 1) + q_offset
        last_pos = tl.minimum((first_block + Q_BLOCKS) * BLOCK, q_len) - 1 + q_offset
        kv_end = tl.minimum(n_kv_blocks, (last_pos // SEGMENT + 1) * SEGMENT_BLOCKS)
        # Key blocks before the first query block's diagonal segment are visible to every row.
        all_visible = ((first_block * BLOCK + q_offset) // SEGMENT) * SEGMENT_BLOCKS
        q_row = bh * q_rows_per_head + tile * M
        k_row = (b * kv_heads + h_kv) * k_rows_per_head
        f_head = slot_first_ptr + b * stride_fb + h_kv * stride_fh
        if FP8:  # Q's per-slot scales (rows past the head's end are masked out at the end)
            descale = tl.load(q_descale_ptr + q_row + m_idx, mask=tile * M + m_idx < q_rows_per_head, other=0.0)
            row_scale = logit_scale * descale
        else:
            row_scale = tl.full([M], logit_scale, tl.float32)

        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, N], tl.float32)
        if PEAK:  # the same online softmax over each antidiagonal's largest product
            peak_m = tl.full([M], float("-inf"), tl.float32)
            peak_l = tl.zeros([M], tl.float32)
            peak = tl.full([M, N], float("-inf"), tl.float32)
        tl.debug_barrier()
        # One loop over (key tile, chunk): the loads stay pipelined across key tiles.
        for step in range(0, tl.cdiv(kv_end, TILE_BLOCKS) * STRIDE):
            t = step % STRIDE
            j0 = (step // STRIDE) * TILE_BLOCKS
            q_chunk = q_desc.load([q_row, (STRIDE - 1 - t) * HEAD_DIM])
            k_chunk = k_desc.load([k_row + j0 * K_ROWS, t * HEAD_DIM])
            if PEAK:
                term = tl.dot(q_chunk, tl.trans(k_chunk), input_precision=PRECISION)
                acc += term
                peak = tl.maximum(peak, term)
            else:
                acc = tl.dot(q_chunk, tl.trans(k_chunk), acc, input_precision=PRECISION)
            if t == STRIDE - 1:
                logits = acc * row_scale[:, None]
                if PEAK:  # the mean's 1/S is in row_scale; the peak is one product
                    peak_logits = peak * (row_scale * STRIDE)[:, None]
                if j0 + TILE_BLOCKS > all_visible:  # near the diagonal: compare positions
                    slot = j0 * K_ROWS + n_idx
                    first = tl.load(f_head + slot, mask=slot < kv_end * K_ROWS, other=_NOT_VISIBLE_POSITION)
                    visible = first[None, :] <= row_last[:, None]
                    logits = tl.where(visible, logits, float("-inf"))
                    if PEAK:
                        peak_logits = tl.where(visible, peak_logits, float("-inf"))
                tile_cells = m_idx[:, None] * SCRATCH_COLS + (j0 + c_idx)[None, :]
                if PEAK:
                    peak_m, peak_l = _online_block_softmax(
                        peak_logits, peak_m, peak_l, peak_base + tile_cells, M, TILE_BLOCKS, K_ROWS
                    )
                    peak = tl.full([M, N], float("-inf"), tl.float32)
                m_i, l_i = _online_block_softmax(logits, m_i, l_i, scratch_base + tile_cells, M, TILE_BLOCKS, K_ROWS)
                acc = tl.zeros([M, N], tl.float32)
        row_lse = _log2_total(m_i, l_i)
        if PEAK:
            peak_lse = _log2_total(peak_m, peak_l)
        tl.debug_barrier()
        out_q = first_block + out_blocks
        # 64-bit offsets: long batches hold more than 2**31 scores
        out_head = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        for j0 in range(0, kv_end, TILE_BLOCKS):
            tile_cells = m_idx[:, None] * SCRATCH_COLS + (j0 + c_idx)[None, :]
            probs = tl.exp2(tl.load(scratch_base + tile_cells) - row_lse[:, None])
            if PEAK:
                peak_block = tl.load(peak_base + tile_cells)
                probs += peak_weight * (tl.exp2(peak_block - peak_lse[:, None]) - probs)
            probs = tl.where(row_valid[:, None], probs, 0.0)
            scores = tl.sum(tl.reshape(probs, (Q_BLOCKS, ROWS, TILE_BLOCKS)), axis=1)
            cols = j0 + c_idx
            tl.store(
                out_head + out_q[:, None] * stride_oq + cols[None, :],
                scores,
                mask=(out_q < n_q_blocks)[:, None] & (cols < kv_end)[None, :],
            )


def supports(q: torch.Tensor, layout: BlockLayout, stride: int, *, fp8: bool = False, peak: bool = False) -> bool:
    """Whether the fused kernel handles this shape: power-of-two tiles of at most 256 rows, and
    tiles that fit the device's shared memory (fp32 at head_dim 256 does not: torch scores it)."""
    dim = q.shape[-1]
    rows = (layout.block_size // stride, layout.kv_block // stride)
    return (
        all(4 <= r <= 256 and r & (r - 1) == 0 for r in rows) and dim >= 16 and dim & (dim - 1) == 0
        and _launch_options(1 if fp8 else q.element_size(), peak, dim, rows[1], shared_memory(q.device)) is not None
    )


def _shared_memory_needed(slots: int, stages: int, dim: int, itemsize: int) -> int:
    """An upper bound on the kernel's shared memory: a Q chunk and a K chunk per stage (Triton
    reported 262 144 bytes at 64 slots, 2 stages, fp32, head_dim 256; this gives 393 216)."""
    return (_TILE_ROWS + slots) * dim * itemsize * stages


def _launch_options(itemsize: int, peak: bool, dim: int, key_rows: int, shared_bytes: int) -> tuple[int, int, int] | None:
    """``(key slots per tile, warps, stages)`` for operands of ``itemsize`` bytes: the fastest
    measured on Hopper at head_dim 128, shrunk for fp32 to fit shared memory, halved with a peak
    estimate (three ``[rows, slots]`` fp32 tiles in registers instead of one), and halved again
    while a tile does not fit ``shared_bytes`` (None: no tile of at least one key block fits)."""
    slots, warps, stages = {1: (256, 8, 3), 2: (256, 8, 2)}.get(itemsize, (64, 8, 2))
    slots = min(slots, 128) if peak else slots
    while _shared_memory_needed(max(slots, key_rows), stages, dim, itemsize) > shared_bytes - 4096:
        if slots <= key_rows:
            return None
        slots //= 2
    return slots, warps, stages


def antidiagonal_block_scores_fused(
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    stride: int,
    scale: float,
    *,
    tile_slots: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fp8: bool = False,
    peak_weight: float = 0.0,
) -> torch.Tensor:
    """Fused equivalent of :func:`flex_pbs.engine.score.antidiagonal_block_scores`.

    Args:
        q: ``[B, Hq, Lq, D]``; k_perm: ``[B, Hkv, Lk, D]`` (permuted layout);
        key_order: long ``[B, Hkv, Lk]``.
        tile_slots, num_warps, num_stages: key slots per tile and Triton launch options
            (default: :func:`_launch_options` of the operand dtype).
        fp8: multiply in float8 e4m3 (Hopper): Q is converted in one pass, each stride slot
            scaled to ``±240`` on its own; K (a quarter of Q's size under GQA) with one scale
            from a max over the tensor. The kernel reads the scales on the device.
        peak_weight: share of the peak estimate (a second online softmax, over each
            antidiagonal's largest product) in the scores.

    Returns:
        float32 ``[B, Hq, nQ, nK]``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_perm.shape[1]
    rows, k_rows = layout.block_size // stride, layout.kv_block // stride
    n_q, n_k = layout.num_q_blocks, layout.num_kv_blocks
    peak = peak_weight > 0
    options = _launch_options(1 if fp8 else q.element_size(), peak, dim, k_rows, shared_memory(q.device))
    if options is None:
        raise ValueError(f"no tile of the fused scorer fits shared memory at head_dim {dim} in {q.dtype}: "
                         "check supports() first")
    slots, warps, stages = options
    tile_slots, num_warps, num_stages = tile_slots or slots, num_warps or warps, num_stages or stages
    q_blocks = max(1, _TILE_ROWS // rows)
    tile_blocks = max(1, tile_slots // k_rows)
    n_q_tiles = triton.cdiv(n_q, q_blocks)
    scratch_cols = triton.cdiv(n_k, tile_blocks) * tile_blocks
    # Positions fit int32 (half the registers of int64 in the kernel's visibility test).
    slot_first = block_min_position(key_order, layout.kv_block, stride).clamp_(max=_INT32_MAX).int()
    out = torch.zeros(batch, q_heads, n_q, n_k, device=q.device, dtype=torch.float32)
    q_descale = k_amax = out  # only read in fp8
    if fp8:
        k_amax = _abs_max(k_perm).reshape(1)
        (q_in, q_descale), k_in = _to_fp8_slots(q, stride), _to_fp8(k_perm, k_amax, stride)
    else:
        q_in, k_in = _padded_rows(q, stride), _padded_rows(k_perm, stride)
    # [B, H, L, D] -> [B·H·L/S, S·D]: row i of a head holds the tokens of stride slot i.
    q_desc = TensorDescriptor.from_tensor(q_in.view(-1, stride * dim), [q_blocks * rows, dim])
    k_desc = TensorDescriptor.from_tensor(k_in.view(-1, stride * dim), [tile_blocks * k_rows, dim])
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    programs = min(n_q_tiles * batch * q_heads, n_sms)
    scratch = torch.empty(programs, q_blocks * rows, scratch_cols, device=q.device, dtype=torch.float32)
    peak_scratch = torch.empty_like(scratch) if peak else scratch  # only used with a peak estimate
    _antidiagonal_kernel[(programs,)](
        q_desc, k_desc, slot_first, out, scratch, peak_scratch, q_descale, k_amax,
        slot_first.stride(0), slot_first.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        q_len, layout.q_offset, n_q, n_k, q_heads, kv_heads, n_q_tiles, batch * q_heads, programs,
        q_in.shape[2] // stride, k_in.shape[2] // stride,
        scale / stride * _LOG2E, float(peak_weight),
        Q_BLOCKS=q_blocks, ROWS=rows, K_ROWS=k_rows, STRIDE=stride, HEAD_DIM=dim, TILE_BLOCKS=tile_blocks,
        SEGMENT_BLOCKS=layout.segment_size // layout.kv_block, SCRATCH_COLS=scratch_cols, FP8=fp8, PEAK=peak,
        # fp32 operands: three tf32 products (fp32 accuracy on tensor cores); plain tf32's
        # 10-bit mantissa moves the scores by ~1e-2
        PRECISION="tf32x3" if q_in.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
