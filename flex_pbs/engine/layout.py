"""Block geometry shared by every stage: which key blocks a query block may see.

Queries are never permuted; query ``i`` sits at absolute position ``q_offset + i`` among the
keys (``q_offset = 0`` for a plain prefill, ``kv_len - q_len`` for chunked prefill). Keys are
permuted only inside complete segments, so the *segment* of a key slot equals the segment of
the original key in it, and "earlier segment" is a causal statement that survives permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flex_pbs.engine.config import PBSConfig


# Original position given to padding key slots: later than any query, exact as a float (F.pad
# passes fill values through a double).
PAST_ANY_QUERY = 1 << 60


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, kw_only=True)
class BlockLayout:
    """Sizes and positions of one (query, key) problem cut into blocks and segments: the one
    carrier of block geometry. Every stage and kernel reads its geometry from here; build it
    with :meth:`from_config`.

    Attributes:
        q_len: queries ``Lq``; kv_len: keys ``Lk``; q_offset: position of the first query
            among the keys (``Lk - Lq``).
        block_size: queries per block (FlexAttention's query tile); kv_block: keys per block.
        segment_size: keys per segment (keys are permuted only inside complete segments).
    """

    q_len: int
    kv_len: int
    q_offset: int
    block_size: int
    kv_block: int
    segment_size: int

    def __post_init__(self) -> None:
        minimums = {"q_len": 0, "kv_len": 0, "q_offset": 0, "block_size": 1, "kv_block": 1, "segment_size": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"BlockLayout.{name} must be an int >= {minimum}, got {value!r}")
        if self.q_offset + self.q_len != self.kv_len:
            raise ValueError(f"BlockLayout: q_offset ({self.q_offset}) + q_len ({self.q_len}) must equal kv_len ({self.kv_len})")
        if self.segment_size % self.block_size or self.segment_size % self.kv_block:
            raise ValueError(
                f"BlockLayout.segment_size ({self.segment_size}) must be a multiple of the query block "
                f"({self.block_size}) and of the key block ({self.kv_block})"
            )

    @classmethod
    def from_config(cls, config: PBSConfig, q_len: int, kv_len: int, q_offset: int = 0) -> BlockLayout:
        """The geometry of ``config`` for ``q_len`` queries at the end of ``kv_len`` keys."""
        return cls(
            q_len=q_len, kv_len=kv_len, q_offset=q_offset, block_size=config.block_size,
            kv_block=config.key_block_size or config.block_size, segment_size=config.segment_size,
        )

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.kv_len, self.kv_block)

    def query_block_bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last absolute position of each query block: two long ``[nQ]``."""
        starts = torch.arange(self.num_q_blocks, device=device) * self.block_size
        ends = torch.clamp(starts + self.block_size, max=self.q_len) - 1
        return starts + self.q_offset, ends + self.q_offset

    def key_block_segments(self, device: torch.device) -> torch.Tensor:
        """Segment index of each key block: long ``[nK]``."""
        return torch.arange(self.num_kv_blocks, device=device) * self.kv_block // self.segment_size

    def diagonal_blocks(self, device: torch.device) -> torch.Tensor:
        """Key blocks in a segment the query block overlaps: bool ``[nQ, nK]``.

        These blocks hold the only keys whose causality depends on the token order inside a
        segment; they are always computed, with token-level masking.
        """
        first, last = self.query_block_bounds(device)
        seg = self.key_block_segments(device)
        return (seg[None, :] >= (first // self.segment_size)[:, None]) & (
            seg[None, :] <= (last // self.segment_size)[:, None]
        )

    def earlier_segment_blocks(self, device: torch.device) -> torch.Tensor:
        """Key blocks entirely in segments before the query block's: bool ``[nQ, nK]``.

        Every key there precedes every query of the block, whatever the permutation.
        """
        first, _ = self.query_block_bounds(device)
        seg = self.key_block_segments(device)
        return seg[None, :] < (first // self.segment_size)[:, None]

    def preceding_blocks(self, count: int, device: torch.device) -> torch.Tensor:
        """The ``count`` key blocks just before the query block's diagonal segment: bool ``[nQ, nK]``.

        They hold the query block's most recent earlier-segment keys (in some order).
        """
        first, _ = self.query_block_bounds(device)
        diagonal_start = (first // self.segment_size) * (self.segment_size // self.kv_block)
        blocks = torch.arange(self.num_kv_blocks, device=device)
        return (blocks[None, :] < diagonal_start[:, None]) & (blocks[None, :] >= diagonal_start[:, None] - count)

    def causal_blocks(self, key_order: torch.Tensor) -> torch.Tensor:
        """Blocks holding at least one key visible to the query block: bool ``[B, Hkv, nQ, nK]``.

        Args:
            key_order: long ``[B, Hkv, kv_len]``, original position of each key slot.
        """
        _, last = self.query_block_bounds(key_order.device)
        first_key = block_min_position(key_order, self.kv_block)
        return first_key[:, :, None, :] <= last[None, None, :, None]


def block_min_position(key_order: torch.Tensor, block_size: int, slot_size: int | None = None) -> torch.Tensor:
    """Smallest original position inside each key block, or inside each slot of ``slot_size``
    keys (a divisor of ``block_size``; the antidiagonal stride): long ``[B, Hkv, nK]``, or
    ``[B, Hkv, nK * block_size / slot_size]``. Padding keys count as ``PAST_ANY_QUERY``."""
    batch, heads, kv_len = key_order.shape
    pad = cdiv(kv_len, block_size) * block_size - kv_len
    padded = torch.nn.functional.pad(key_order, (0, pad), value=PAST_ANY_QUERY) if pad else key_order
    slots = padded.shape[-1] // (slot_size or block_size)
    return padded.reshape(batch, heads, slots, slot_size or block_size).amin(dim=-1)
