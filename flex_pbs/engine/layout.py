"""Block geometry shared by every stage: which key blocks a query block may see.

Queries are never permuted; query ``i`` sits at absolute position ``q_offset + i`` among the
keys (``q_offset = 0`` for a plain prefill, ``kv_len - q_len`` for chunked prefill). Keys are
permuted only inside complete segments, so the *segment* of a key slot equals the segment of
the original key in it, and "earlier segment" is a causal statement that survives permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# Original position given to padding key slots: later than any query, exact as a float (F.pad
# passes fill values through a double).
PAST_ANY_QUERY = 1 << 60


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Sizes and positions of a (query, key) problem cut into blocks and segments.

    ``block_size`` tokens per query block; ``key_block_size`` per key block (``None``: the same).
    """

    q_len: int
    kv_len: int
    q_offset: int
    block_size: int
    segment_size: int
    key_block_size: int | None = None

    @property
    def kv_block(self) -> int:
        """Tokens per key block."""
        return self.key_block_size or self.block_size

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
    return padded.reshape(batch, heads, -1, slot_size or block_size).amin(dim=-1)
