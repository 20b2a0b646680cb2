"""Stage 4, mask: a FlexAttention ``BlockMask`` straight from block-level tensors.

No L×L tensor and no ``create_block_mask`` call: selected blocks outside the diagonal segment
are *full* blocks (no mask_mod cost); diagonal-segment blocks are *partial* blocks whose
mask_mod compares original key positions with query positions, so causality is exact.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from flex_pbs.engine.attend import bucket_length
from flex_pbs.engine.layout import PAST_ANY_QUERY, BlockLayout, cdiv

# Inference never needs the transposed (query-major) indices; older torch always builds them.
_SKIP_Q_BLOCKS = (
    {"compute_q_blocks": False}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
    else {}
)


def block_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise indices of True blocks, ascending, as FlexAttention wants them.

    Args:
        blocks: bool ``[B, H, nQ, nK]``.

    Returns:
        ``(num_blocks int32 [B, H, nQ], indices int32 [B, H, nQ, nK])``; only the first
        ``num_blocks`` indices of a row are meaningful.
    """
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


# FlexAttention's index lists: (partial counts, partial indices, full counts, full indices),
# int32 ``[B, H, nQ]`` and ``[B, H, nQ, N]`` (``N`` = nK, or less when a budget bounds a row).
MaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def selection_indices(selected: torch.Tensor, diagonal: torch.Tensor) -> MaskIndices:
    """Index lists of a selection: diagonal-segment blocks partial, the others full.

    Args:
        selected: bool ``[B, Hq, nQ, nK]``; diagonal: bool ``[nQ, nK]``.
    """
    return (*block_indices(selected & diagonal), *block_indices(selected & ~diagonal))


def build_flex_mask(
    indices: MaskIndices,
    key_order: torch.Tensor | None,
    layout: BlockLayout,
    kernel_lengths: tuple[int, int] | None = None,
) -> BlockMask:
    """The BlockMask that computes exactly the indexed blocks, token-causal on partial ones.

    Args:
        indices: from :func:`selection_indices` (or the fused selection kernel).
        key_order: long ``[B, Hkv, Lk]``, original position of each key slot, or None when
            the keys are in their original order (the mask then holds no per-key tensor).
        layout: the block geometry (query offset among the keys included).
        kernel_lengths: ``(q_len, kv_len)`` the kernel runs at, if larger than the real ones
            (padding rows compute nothing; padding keys are never visible).
    """
    kv_num, kv_idx, full_num, full_idx = indices
    q_heads = kv_idx.shape[1]
    q_block, kv_block = layout.block_size, layout.kv_block
    q_len, kv_len = kernel_lengths or (layout.q_len, layout.kv_len)
    pad_q = -(-q_len // q_block) - layout.num_q_blocks
    # Lists narrower than the key blocks (a budget bounds every row) serve CUDA's kernel as
    # they are; inductor's CPU kernel reads no key past width * kv_block, so widen them there.
    pad_k = -(-kv_len // kv_block) - kv_idx.shape[-1] if kv_idx.device.type == "cpu" else 0
    if pad_q or pad_k:
        kv_num, full_num = (F.pad(n, (0, pad_q)) for n in (kv_num, full_num))
        kv_idx, full_idx = (F.pad(i, (0, pad_k, 0, pad_q)) for i in (kv_idx, full_idx))
    if kv_idx.device.type == "cpu":  # one CPU kernel serves every batch size (attend.py)
        for t in (kv_num, kv_idx, full_num, full_idx):
            torch._dynamo.maybe_mark_dynamic(t, 0)
    original_position_causal = _causal_mask_mod(key_order, layout, kv_len, q_heads, kv_idx.device)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=original_position_causal,
        seq_lengths=(q_len, kv_len),
        **_SKIP_Q_BLOCKS,
    )


# FlexAttention's backward on CUDA tiles a mask's blocks with up to 128 query and 128 key rows
# (torch's default configs: 64 x 128 and 128 x 64 tiles on an H100 at head_dim <= 128) and
# offers no kernel whose tiles do not divide the blocks. Gradients therefore run on blocks of
# a multiple of 128 x 128.
GRADIENT_BLOCK = 128


class GradientMask(NamedTuple):
    """What the differentiable attention call runs on.

    Attributes:
        block_mask: blocks of multiples of :data:`GRADIENT_BLOCK`, with query-block indices.
        key_slots: long ``[B, Hkv, S]`` (or ``[B, 1, S]``, the same for every head), the
            input key (index into the unpermuted ``k``) each of the kernel's ``S`` key slots
            holds; None: the kernel reads ``k`` as given.
        reads_selection: the mask_mod looks the selection up per token (a tile-sized gather).
    """

    block_mask: BlockMask
    key_slots: torch.Tensor | None
    reads_selection: bool


def differentiable_flex_mask(
    selected: torch.Tensor, key_order: torch.Tensor | None, layout: BlockLayout
) -> GradientMask:
    """The plan's selection in a form that FlexAttention can differentiate on CUDA.

    Three layouts, each computing exactly the plan's attention, token for token:

    * Blocks already multiples of 128 x 128: the inference mask plus query-block indices.
    * Query blocks of 128 and half as many keys (the default 128 x 64): *paired key slots*.
      Each KV head's key blocks are paired, the most selected with the most selected, and each
      pair is a 128-key tile laid out three times: copy 0 shows both blocks, copy 1 the first,
      copy 2 the second (hidden slots get a position no query sees). A row's tile is in copy 0
      where the row selects both blocks (full off the diagonal segments), else in the copy of
      its one block, and the mask_mod stays the one-gather causal check of the permuted
      inference mask. It costs two more copies of K and V. On an H100 at 128K, density 0.10,
      forward + backward took 268 ms, against 855 ms when merging with a per-token lookup of
      the selection (nearly every merged tile held one selected half) and 362 ms with one
      tile per selected block.
    * Other geometries: blocks merged up to multiples of 128 in each dimension; a merged block
      is full where every block in it is selected and none is in a diagonal segment, and a
      partial one's mask_mod looks the selection up per token.

    Args:
        selected: bool ``[B, Hq, nQ, nK]``, the plan's computed blocks (``plan.block_mask``).
        key_order: long ``[B, Hkv, Lk]``, or None when the keys are in their original order.
        layout: the plan's block geometry.
    """
    q_block, kv_block = layout.block_size, layout.kv_block
    q_factor = math.lcm(q_block, GRADIENT_BLOCK) // q_block
    kv_factor = math.lcm(kv_block, GRADIENT_BLOCK) // kv_block
    if q_factor == 1 and kv_factor == 2:
        return _paired_key_slot_mask(selected, key_order, layout)
    batch, q_heads, n_q, n_kv = selected.shape
    merged_q, merged_kv = cdiv(n_q, q_factor), cdiv(n_kv, kv_factor)
    padding = (0, merged_kv * kv_factor - n_kv, 0, merged_q * q_factor - n_q)
    padded = F.pad(selected, padding)
    diagonal = F.pad(layout.diagonal_blocks(selected.device), padding)
    tiles = padded.view(batch, q_heads, merged_q, q_factor, merged_kv, kv_factor)
    touches_diagonal = diagonal.view(merged_q, q_factor, merged_kv, kv_factor).any(dim=3).any(dim=1)
    full = tiles.all(dim=5).all(dim=3) & ~touches_diagonal
    partial = tiles.any(dim=5).any(dim=3) & ~full
    causal = _causal_mask_mod(key_order, layout, merged_kv * kv_block * kv_factor, q_heads, selected.device)
    if q_factor == kv_factor == 1:  # partial blocks are exactly the diagonal ones: causality suffices
        mask_mod = causal
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return causal(b, h, q_idx, kv_idx) & padded[b, h, q_idx // q_block, kv_idx // kv_block]

    block_mask = BlockMask.from_kv_blocks(
        *block_indices(partial),
        *block_indices(full),
        BLOCK_SIZE=(q_block * q_factor, kv_block * kv_factor),
        mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )
    return GradientMask(block_mask, key_order, reads_selection=kv_factor * q_factor > 1)


def _paired_key_slot_mask(selected: torch.Tensor, key_order: torch.Tensor | None, layout: BlockLayout) -> GradientMask:
    """:func:`differentiable_flex_mask` for 128-query x 64-key blocks: pairs of key blocks as
    128-key tiles, laid out three times (both halves shown; the first only; the second only)."""
    batch, q_heads, n_q, n_kv = selected.shape
    kv_block, device = layout.kv_block, selected.device
    if key_order is None:  # one order serves every head
        key_order = torch.arange(layout.kv_len, device=device).view(1, 1, -1)
    kv_heads = key_order.shape[1]
    group, n_pairs = q_heads // kv_heads, cdiv(n_kv, 2)
    rows = group * n_q  # a KV head's (query head, query block) rows
    padded = F.pad(selected, (0, 2 * n_pairs - n_kv)).view(batch, kv_heads, rows, 2 * n_pairs)
    # Pair the key blocks that most rows select, so that a tile often serves a row whole.
    pairing = padded.sum(dim=2).argsort(dim=-1, descending=True, stable=True)  # [B, Hkv, 2P]
    by_pair = padded.gather(3, pairing[:, :, None].expand(-1, -1, rows, -1)).view(batch, q_heads, n_q, n_pairs, 2)
    diagonal = F.pad(layout.diagonal_blocks(device), (0, 2 * n_pairs - n_kv))[None, None]
    diagonal_pair = diagonal.expand(batch, kv_heads, -1, -1).gather(3, pairing[:, :, None].expand(-1, -1, n_q, -1))
    diagonal_pair = diagonal_pair.view(batch, kv_heads, 1, n_q, n_pairs, 2).any(dim=5)
    diagonal_pair = diagonal_pair.expand(-1, -1, group, -1, -1).reshape(batch, q_heads, n_q, n_pairs)
    first, second = by_pair[..., 0], by_pair[..., 1]
    both = first & second
    # Tiles: copy 0 (pairs both of whose blocks a row selects; full off the diagonal segments),
    # copy 1 (the first block only), copy 2 (the second block only).
    partial = torch.cat([both & diagonal_pair, first & ~second, second & ~first], dim=-1)
    full = torch.cat([both & ~diagonal_pair, torch.zeros_like(partial[..., n_pairs:])], dim=-1)
    # Slot o of tile t holds key o % 64 of block pairing[2t + o // 64] (the plan's key layout).
    tile = 2 * kv_block
    offsets = torch.arange(tile, device=device)
    blocks = pairing.view(batch, kv_heads, n_pairs, 2)[..., offsets // kv_block]
    layout_index = (blocks * kv_block + offsets % kv_block).view(batch, kv_heads, n_pairs * tile)
    # A key's index in the unpermuted k is its original position; padding slots hold key 0 at a
    # position no query sees.
    slots = F.pad(key_order.expand(batch, kv_heads, -1), (0, 2 * n_pairs * kv_block - layout.kv_len)).gather(2, layout_index)
    positions = slots.masked_fill(layout_index >= layout.kv_len, PAST_ANY_QUERY)
    half = (offsets // kv_block).repeat(n_pairs)
    copies = [positions, positions.masked_fill(half != 0, PAST_ANY_QUERY), positions.masked_fill(half != 1, PAST_ANY_QUERY)]
    causal = _causal_mask_mod(torch.cat(copies, dim=-1), layout, 3 * n_pairs * tile, q_heads, device)
    block_mask = BlockMask.from_kv_blocks(
        *block_indices(partial),
        *block_indices(full),
        BLOCK_SIZE=(layout.block_size, tile),
        mask_mod=causal,
        seq_lengths=(layout.q_len, 3 * n_pairs * tile),
    )
    return GradientMask(block_mask, slots.repeat(1, 1, 3), reads_selection=False)


def _causal_mask_mod(key_order: torch.Tensor | None, layout: BlockLayout, kv_len: int, q_heads: int, device: torch.device):
    """The mask_mod that keeps a key slot where its original position is at or before the
    query's (``key_order`` None: the slots are the original positions)."""
    if key_order is None:
        # A tensor, not a Python int: the compiled kernel must not specialise on the offset.
        # Filled on the device: copying a host value in would wait for all queued GPU work.
        offset = torch.full((), layout.q_offset, dtype=torch.int64, device=device)

        def original_position_causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return original_position_causal
    # Shifting by the query offset lets the mask_mod compare with the local query index.
    shifted_order = F.pad(key_order - layout.q_offset, (0, kv_len - key_order.shape[-1]), value=PAST_ANY_QUERY)
    if shifted_order.device.type == "cpu":
        torch._dynamo.maybe_mark_dynamic(shifted_order, 0)
    group = q_heads // key_order.shape[1]

    def original_position_causal(b, h, q_idx, kv_idx):
        return shifted_order[b, h // group, kv_idx] <= q_idx

    return original_position_causal


def build_stage(
    indices: MaskIndices, key_order: torch.Tensor, layout: BlockLayout, permuted: bool = True
) -> BlockMask:
    """Stage 4: the BlockMask, at the length the compiled kernel runs at on this device
    (``permuted=False``: keys in original order, the mask needs no per-key tensor)."""
    device_type = key_order.device.type
    kernel_lengths = (
        bucket_length(layout.q_len, layout.block_size, device_type),
        bucket_length(layout.kv_len, layout.kv_block, device_type),
    )
    return build_flex_mask(indices, key_order if permuted else None, layout, kernel_lengths)
