"""Stage 5, attend: one compiled FlexAttention per device type, reused across calls.

Changing the sequence length must never drop to the unfused eager path (which materialises
the full score matrix). On CUDA the kernel is compiled with dynamic shapes, so one compile
serves every length. Inductor's CPU template cannot build dynamic-shape kernels reliably
(torch 2.13: ``cur_kvSplitSize`` undeclared), so on CPU lengths are padded up to a bucket —
at most 8 buckets per doubling of the length, each compiled once — and only the batch size is
dynamic (FlexAttention itself keeps the head counts static). A process may compile
:data:`CPU_MAX_BUCKETS` CPU kernels; past that :class:`CompileBudgetSpent` is raised instead of
running eagerly, and the pipeline answers it with exact attention restricted to the plan.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flex_pbs.engine.layout import cdiv

# Distinct CPU kernels one process may compile (8 length buckets per doubling cover 16
# doublings; batch size 1 and the other batch sizes compile apart).
CPU_MAX_BUCKETS = 128


class CompileBudgetSpent(RuntimeError):
    """The compiled CPU FlexAttention would need one more kernel than :data:`CPU_MAX_BUCKETS`."""

# Measured on an H100 (docs/design.md: 128K, head_dim 128, density 0.10): 1.27x the ideal density x SDPA
# time, vs 1.38x with FlexAttention's default tiles. 16-bit inputs only: in fp32 these tiles
# need 330 KB of shared memory (an H100 has 227 KB). Other shapes keep the defaults.
HOPPER_D128_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True}

# FlexAttention's stage count when the options do not name one (torch's default configs).
_DEFAULT_STAGES = 3


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


def _shared_memory_bytes(options: dict[str, Any], head_dim: int, itemsize: int, mask_gathers: bool = False) -> int:
    """Shared memory FlexAttention's forward kernel needs for explicit tiles: a Q tile and, per
    stage, a K and a V tile (``num_stages + 1`` tiles in all with TMA), at the padded head dim.
    Triton's reports on an H100: 329 760 bytes for 128 x 128 tiles, TMA, 3 stages, fp32, d=128
    (this gives 327 680); 262 144 for 128 x 64, 3 stages, bf16, d=256 (this gives 262 144).
    A mask_mod that gathers from a tensor (the gradient mask's selection table) also converts a
    tile of 32-bit values through shared memory: 235 576 bytes for 128 x 128, TMA, 3 stages,
    bf16, d=128 (this gives 229 376)."""
    padded_dim = 1 << max(4, (head_dim - 1).bit_length())
    stages = options.get("num_stages", _DEFAULT_STAGES)
    kv_tiles = stages + 1 if options.get("USE_TMA") else 2 * stages
    gather_tile = options["BLOCK_M"] * options["BLOCK_N"] * 4 if mask_gathers else 0
    return (options["BLOCK_M"] + kv_tiles * options["BLOCK_N"]) * padded_dim * itemsize + gather_tile


def _fit_shared_memory(
    options: dict[str, Any], head_dim: int, itemsize: int, shared_memory: int, mask_gathers: bool = False
) -> dict[str, Any]:
    """Shrink explicit tiles until they fit: fewer stages first, then narrower key tiles, then
    fewer query rows (smaller tiles still divide the mask's power-of-two blocks)."""
    options = dict(options)
    budget = shared_memory - 4096  # Triton's own scratch (2 080 bytes in the case above)
    while _shared_memory_bytes(options, head_dim, itemsize, mask_gathers) > budget:
        if options.get("num_stages", _DEFAULT_STAGES) > 2:
            options["num_stages"] = 2
        elif options["BLOCK_N"] > 16:
            options["BLOCK_N"] //= 2
        elif options["BLOCK_M"] > 16:
            options["BLOCK_M"] //= 2
        else:
            raise ValueError(
                f"head_dim {head_dim} in {itemsize * 8}-bit floats needs more shared memory than this GPU "
                f"has ({shared_memory} bytes) even with 16 x 16 tiles: use bfloat16 or float16 inputs"
            )
    return options


def cuda_kernel_options(
    head_dim: int,
    block_size: tuple[int, int],
    seq_lengths: tuple[int, int],
    capability: tuple[int, int],
    *,
    itemsize: int = 2,
    keys_in_order: bool = False,
    shared_memory: int = 232448,
    backward: bool = False,
    mask_gathers: bool = False,
) -> dict[str, Any] | None:
    """FlexAttention kernel options on a CUDA device of compute ``capability``.

    Tiles: tuned ones where they were measured (Hopper, head_dim 128, 16-bit inputs, blocks of
    128 queries x 128 or 64 keys: 8 warps, 3 stages, TMA; for 128x64 at 128K 1.18x the ideal
    time against 1.26x with FlexAttention's own); tiles that divide the mask's blocks where
    FlexAttention's own (up to 128 rows) would not (``block_size`` 64, say); otherwise
    FlexAttention's defaults. Explicit tiles are shrunk to fit ``shared_memory`` (fp32 doubles
    what a tile needs). ``IS_DIVISIBLE`` whenever both lengths are multiples of 128: every tile
    is whole, so the per-tile bounds masks that a dynamic-shape compile otherwise keeps are
    dropped (FlexAttention sets this itself only for static shapes; an H100 attends 5-7%
    faster with it). It costs one more compile, not one per length.

    ``ROWS_GUARANTEED_SAFE`` (skip the guard for rows that have seen no key yet: -0.9% attend
    time) only with ``keys_in_order``. The kernel visits a row's partial blocks before its full
    ones, and without the guard a row whose *first* tile holds no key it may see gets
    ``exp2(-inf - -inf)`` = NaN. In original key order the first partial tile starts at the
    diagonal segment, at or before every query of the block, so each row sees a key there; a
    permuted diagonal segment may put a segment's first queries' keys in its second block.

    With ``backward`` (the call will be differentiated) the explicit tiles, warps, stages and
    row guard are the forward kernel's only (``fwd_`` options): the backward kernel keeps
    torch's own configs for its four tiles, which the forward's 8 warps and 3 stages would
    otherwise override. ``IS_DIVISIBLE`` serves both.

    Args:
        head_dim: ``D``; block_size: the mask's ``(query, key)`` block; seq_lengths: the
            kernel's ``(q_len, kv_len)``; itemsize: bytes per input element;
            shared_memory: the device's opt-in shared memory per block (H100: 232 448);
            backward: the options serve a call that autograd will differentiate;
            mask_gathers: the mask_mod reads a tensor at computed indices (more shared memory).

    Returns:
        The options, or None for FlexAttention's defaults throughout.
    """
    tiles = tuple(largest_tile_dividing(size) for size in block_size)
    hopper_tuned = block_size in ((128, 128), (128, 64)) and head_dim == 128 and capability == (9, 0)
    if hopper_tuned and itemsize == 2:
        options = {**HOPPER_D128_OPTIONS, "BLOCK_N": block_size[1]}
        if keys_in_order:
            options["ROWS_GUARANTEED_SAFE"] = True
    elif tiles != (128, 128):
        options = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    else:
        options = {}
    if "BLOCK_M" in options:
        options = _fit_shared_memory(options, head_dim, itemsize, shared_memory, mask_gathers)
    if backward:
        options = {f"fwd_{name}": value for name, value in options.items()}
    if all(length % 128 == 0 for length in seq_lengths):
        options["IS_DIVISIBLE"] = True
    return options or None


def default_kernel_options(
    q: torch.Tensor, block_mask: BlockMask, keys_in_order: bool = False, backward: bool = False,
    mask_gathers: bool = False,
) -> dict[str, Any] | None:
    """:func:`cuda_kernel_options` for ``q``'s device, dtype and the mask; None off CUDA."""
    if not q.is_cuda:
        return None
    from flex_pbs.engine.kernels import shared_memory

    return cuda_kernel_options(
        q.shape[-1], tuple(block_mask.BLOCK_SIZE), tuple(block_mask.seq_lengths),
        torch.cuda.get_device_capability(q.device), itemsize=q.element_size(), keys_in_order=keys_in_order,
        shared_memory=shared_memory(q.device), backward=backward, mask_gathers=mask_gathers,
    )


@contextlib.contextmanager
def _recompile_limit_logged_by_us() -> Iterator[None]:
    """Dynamo logs a warning each time a call hits the recompile limit; flex_pbs raises
    :class:`CompileBudgetSpent` instead and the pipeline warns once, so silence it meanwhile."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
    keys_in_order: bool = False,
) -> torch.Tensor:
    """Run the compiled FlexAttention, padding to the mask's kernel lengths if needed.

    Differentiable on CUDA when the inputs need grad and ``block_mask`` carries query-block
    indices (:func:`flex_pbs.engine.mask.differentiable_flex_mask`); forward only on CPU.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (GQA handled natively).
        block_mask: built for ``(q_len, kv_len)`` at least as long as the inputs.
        kernel_options: FlexAttention kernel options; default :func:`default_kernel_options`.
        keys_in_order: the keys are in their original order (not permuted) and the mask is
            causal by original position: every row's first computed tile then holds a key it
            sees, which lets the tuned Hopper kernel skip its fully-masked-row guard.

    Returns:
        ``[B, Hq, Lq, D]``.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and not q.is_cuda:
        raise NotImplementedError(
            "FlexAttention has no backward on CPU: pbs_attention differentiates there through exact "
            "attention restricted to the plan; or run under torch.inference_mode() or torch.no_grad(), "
            "or detach the inputs"
        )
    if needs_grad and block_mask.q_indices is None:
        raise ValueError(
            "FlexAttention's backward needs the mask's query-block indices, which this BlockMask lacks: "
            "build it with flex_pbs.engine.mask.differentiable_flex_mask"
        )
    if not needs_grad:  # inputs that merely carry requires_grad under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    q_len = q.shape[-2]
    kernel_q, kernel_kv = block_mask.seq_lengths
    q_in, k_in, v_in = _pad_tokens(q, kernel_q), _pad_tokens(k, kernel_kv), _pad_tokens(v, kernel_kv)
    if not q.is_cuda:  # one CPU kernel per length bucket serves every batch size
        for t in (q_in, k_in, v_in):
            torch._dynamo.maybe_mark_dynamic(t, 0)
    if kernel_options is None:
        kernel_options = default_kernel_options(q, block_mask, keys_in_order, backward=needs_grad)
    attend = compiled_flex_attention(q.device.type)
    try:
        with torch._dynamo.config.patch(recompile_limit=CPU_MAX_BUCKETS, fail_on_recompile_limit_hit=True), \
                _recompile_limit_logged_by_us():
            out = attend(
                q_in,
                k_in,
                v_in,
                block_mask=block_mask,
                scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
                kernel_options=kernel_options,
            )
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise CompileBudgetSpent(
            f"flex_pbs compiled {CPU_MAX_BUCKETS} FlexAttention kernels in this process; a new shape "
            f"({tuple(q.shape)}) would need another"
        ) from error
    return out[:, :, :q_len]
