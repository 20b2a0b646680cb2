"""Keys (or values) into the permuted layout in Triton: whole rows copied at once.

``torch.gather`` with a ``[B, H, L, D]`` index reads one index per element; here each program
copies ``ROWS`` rows of ``D`` contiguous elements, reading one position per row, from any
strided input (transformers hands K and V over as transposed views) into a contiguous output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 64


@triton.jit
def _gather_rows_kernel(
    x_ptr, order_ptr, out_ptr, stride_b, stride_h, stride_l, heads, length,
    DIM: tl.constexpr, ROWS: tl.constexpr,
):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < length
    source = tl.load(order_ptr + bh * length + rows, mask=row_ok, other=0)
    dims = tl.arange(0, DIM)
    base = (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    values = tl.load(x_ptr + base + source[:, None] * stride_l + dims[None, :], mask=row_ok[:, None])
    tl.store(out_ptr + (bh.to(tl.int64) * length + rows[:, None]) * DIM + dims[None, :], values, mask=row_ok[:, None])


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel handles ``x``: a power-of-two head dim, contiguous in it."""
    dim = x.shape[-1]
    return dim >= 16 and dim & (dim - 1) == 0 and x.stride(-1) == 1


def permute_keys_fused(x: torch.Tensor, key_order: torch.Tensor) -> torch.Tensor:
    """Fused equivalent of :func:`flex_pbs.engine.permute.permute_keys`: ``[B, Hkv, Lk, D]``,
    contiguous."""
    batch, heads, length, dim = x.shape
    out = torch.empty(batch, heads, length, dim, device=x.device, dtype=x.dtype)
    order = key_order if key_order.is_contiguous() else key_order.contiguous()
    _gather_rows_kernel[(batch * heads, triton.cdiv(length, _ROWS))](
        x, order, out, x.stride(0), x.stride(1), x.stride(2), heads, length, DIM=dim, ROWS=_ROWS,
    )
    return out
