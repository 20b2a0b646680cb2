"""Stage 5, attend: one compiled FlexAttention per device type, reused across calls.

Changing the sequence length must never drop to the unfused eager path (which materialises
the full score matrix). On CUDA the kernel is compiled with dynamic shapes, so one compile
serves every length. Inductor's CPU template cannot build dynamic-shape kernels reliably
(torch 2.13: ``cur_kvSplitSize`` undeclared), so on CPU lengths are padded up to a bucket —
at most 8 buckets per doubling of the length, each compiled once — and the recompile limit is
raised for this call only, with ``fail_on_recompile_limit_hit`` so that exhausting it raises
instead of silently running eagerly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .layout import cdiv

# Distinct CPU length buckets one process may compile (8 per doubling covers 16 doublings).
CPU_MAX_BUCKETS = 128

# Measured on an H100 (benchmarks/NOTES.md, 128K, head_dim 128, density 0.10): 1.27x the ideal
# density x SDPA time, vs 1.38x with FlexAttention's default tiles. Other shapes keep the defaults.
# ROWS_GUARANTEED_SAFE skips the fully-masked-row guard: every PBS query row computes its own
# diagonal block and sees at least its own key (NOTES.md run 6: -0.9% attend time at density 0.05).
HOPPER_D128_OPTIONS = {
    "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True, "ROWS_GUARANTEED_SAFE": True,
}


@lru_cache(maxsize=None)
def compiled_flex_attention(device_type: str) -> Callable[..., torch.Tensor]:
    """The process-wide compiled ``flex_attention`` for a device type."""
    return torch.compile(flex_attention, dynamic=device_type != "cpu", fullgraph=True)


def bucket_length(length: int, block_size: int, device_type: str) -> int:
    """The length the kernel runs at: exact on CUDA; on CPU rounded up to a bucket.

    CPU buckets are multiples of ``block_size * 2**max(0, ceil(log2(blocks)) - 4)``: 16
    exact block counts, then 8 buckets per doubling, so padding stays under 12.5%.
    """
    if device_type != "cpu":
        return length
    blocks = cdiv(length, block_size)
    granule = 1 << max(0, (blocks - 1).bit_length() - 4)
    return cdiv(blocks, granule) * granule * block_size


def largest_tile_dividing(block_size: int, limit: int = 128) -> int:
    """The largest power of two ``<= limit`` dividing ``block_size`` (Triton tiles are powers of two)."""
    return min(limit, block_size & -block_size)


def cuda_kernel_options(
    head_dim: int, block_size: tuple[int, int], seq_lengths: tuple[int, int], capability: tuple[int, int]
) -> dict[str, Any] | None:
    """FlexAttention kernel options on a CUDA device of compute ``capability``.

    Tiles: tuned ones where they were measured (Hopper, head_dim 128, blocks of 128 queries ×
    128 or 64 keys: 8 warps, 3 stages, TMA; for 128×64 at 128K 1.18× the ideal time against
    1.26× with FlexAttention's own, NOTES.md run 10); tiles that divide the mask's blocks where
    FlexAttention's own (up to 128 rows) would not (``block_size`` 64, say); otherwise
    FlexAttention's defaults. ``IS_DIVISIBLE`` whenever both lengths are multiples of 128:
    every tile is whole, so the per-tile bounds masks that a dynamic-shape compile otherwise
    keeps are dropped (FlexAttention sets this itself only for static shapes; an H100 attends
    5-7% faster with it, NOTES.md run 7). It costs one more compile, not one per length.
    None: FlexAttention's defaults throughout.
    """
    tiles = tuple(largest_tile_dividing(size) for size in block_size)
    if block_size in ((128, 128), (128, 64)) and head_dim == 128 and capability == (9, 0):
        options = {**HOPPER_D128_OPTIONS, "BLOCK_N": block_size[1]}
    elif tiles != (128, 128):
        options = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    else:
        options = {}
    if all(length % 128 == 0 for length in seq_lengths):
        options["IS_DIVISIBLE"] = True
    return options or None


def default_kernel_options(q: torch.Tensor, block_mask: BlockMask) -> dict[str, Any] | None:
    """:func:`cuda_kernel_options` for ``q``'s device and the mask; None off CUDA."""
    if not q.is_cuda:
        return None
    return cuda_kernel_options(
        q.shape[-1], tuple(block_mask.BLOCK_SIZE), tuple(block_mask.seq_lengths),
        torch.cuda.get_device_capability(q.device),
    )


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run the compiled FlexAttention, padding to the mask's kernel lengths if needed.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (GQA handled natively).
        block_mask: built for ``(q_len, kv_len)`` at least as long as the inputs.
        kernel_options: FlexAttention kernel options; default :func:`default_kernel_options`,
            which on Hopper assume that every query row sees at least one key (true of every
            causal mask, PBS's included).

    Returns:
        ``[B, Hq, Lq, D]``.
    """
    if any(t.requires_grad for t in (q, k, v)):
        # flex_pbs is inference-only for now (FlexAttention has no CPU backward, and the compiled
        # CUDA path fails inside Dynamo with an unreadable trace): name the fix instead. Under
        # no_grad, inputs that merely carry requires_grad are detached (flex refuses them on CPU).
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "flex_pbs has no backward pass yet (prefill/inference only): run under "
                "torch.inference_mode() or torch.no_grad(), or detach the inputs"
            )
        q, k, v = q.detach(), k.detach(), v.detach()
    q_len = q.shape[-2]
    kernel_q, kernel_kv = block_mask.seq_lengths
    q_in, k_in, v_in = _pad_tokens(q, kernel_q), _pad_tokens(k, kernel_kv), _pad_tokens(v, kernel_kv)
    if kernel_options is None:
        kernel_options = default_kernel_options(q, block_mask)
    attend = compiled_flex_attention(q.device.type)
    with torch._dynamo.config.patch(
        recompile_limit=CPU_MAX_BUCKETS, fail_on_recompile_limit_hit=True
    ):
        out = attend(
            q_in,
            k_in,
            v_in,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=kernel_options,
        )
    return out[:, :, :q_len]
