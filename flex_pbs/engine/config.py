"""`PBSConfig`: every knob of the PBS engine in one validated, immutable value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

SCORINGS = ("antidiagonal", "mean", "oracle")
PERMUTES = ("key", "none", "auto")
KEY_SORTS = ("full", "front")
BACKENDS = ("auto", "torch", "triton")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PBSConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"PBSConfig.{name} must be >= {minimum}, got {value}")


def _require_fraction(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"PBSConfig.{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"PBSConfig.{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class PBSConfig:
    """Configuration of permuted block-sparse attention.

    The defaults serve both regimes measured (docs/results.md, "The adaptive default"): blocks
    of 128 queries x 64 keys (FlexAttention's fast 128-row query tiles), antidiagonal scoring
    mixed half and half with the peak estimate, 512-token segments, a forced local window of
    8 key blocks (512 tokens), and **adaptive** permutation: a head's keys are reordered only
    where that cuts the key blocks its last query block needs by 2x or more, and then only
    the segment's most important key block's worth moves to its front (``key_sort="front"``),
    so the other keys keep the structure the estimate reads. On real text this matches or
    beats the unpermuted configuration at equal density; on scattered heavy hitters it
    reaches the exact-mass selection's density. The speed-first preset ``pbs_fast``
    (``flex_pbs.engine.methods``) keeps square 128-token blocks, XAttention's scoring and no
    permutation; the PBS paper's algorithm is ``scoring="mean", permute="key",
    key_sort="full", segment_size=256, key_block_size=None, force_local_blocks=0``.

    Attributes:
        block_size: tokens per query block (and per key block unless ``key_block_size`` is
            set); the FlexAttention tile.
        key_block_size: tokens per key block, a divisor of ``block_size``; ``None`` =
            ``block_size`` (square blocks). The default 64 with ``block_size=128`` selects
            keys at 64-token granularity while FlexAttention keeps its 128-row query tiles
            (64-row tiles run at about half speed on Hopper).
        segment_size: keys are sorted only inside complete segments of this many tokens, and
            the diagonal segment (the query's own) is always computed, token-causally; a
            multiple of ``block_size``, at least two key blocks when keys are permuted
            (sorting inside one block cannot change which blocks hold the important keys).
        threshold: keep the fewest blocks whose cumulative score reaches this fraction of
            the row total; ``1.0`` keeps every causal block (dense).
        scoring: ``"antidiagonal"`` (XAttention-style strided antidiagonal sums),
            ``"mean"`` (softmax of mean-pooled Q·K, the PBS paper) or ``"oracle"`` (the exact
            attention mass of every block: O(L²), an upper bound for analysis only).
        stride: antidiagonal stride S; must divide ``block_size`` and ``key_block_size``.
        peak_weight: the share of the *peak* estimate (softmax of each antidiagonal's largest
            product, which keeps one strong query-key pair that the mean of ``S`` products
            dilutes) mixed into XAttention's mean estimate; ``0.0`` is XAttention's scoring,
            the default ``0.5`` counts a block when it matters to either estimate.
            Only the antidiagonal scorer has it (``mean`` and ``oracle`` ignore it).
        permute: ``"key"`` sorts keys inside segments by importance to the last query
            block; ``"none"`` keeps the original order; ``"auto"`` sorts them only in the
            (batch element, KV head) pairs where sorting cuts the key blocks the last query
            block needs to reach ``threshold`` of its exact attention by ``permute_gain`` or
            more (counted from that block's exact attention, which the importance already is).
        key_sort: how keys are ordered inside a segment when they are permuted: ``"full"``
            sorts them by descending importance (the paper); ``"front"`` moves the segment's
            ``key_block_size`` most important keys into its first block and leaves every key
            in its original relative order otherwise, which gathers the heavy keys as well
            while the other blocks keep the local and diagonal structure the antidiagonal
            estimate reads.
        permute_gain: with ``permute="auto"``, the factor by which sorting must cut the last
            query block's needed (non-forced) key blocks for a head to be permuted.
        force_sink: always compute the block holding original token 0.
        force_local_blocks: always compute this many key blocks just before the diagonal
            segment (a local window; it carries the recent context of a segment's first
            queries, which block scores that sum over a whole query block under-serve).
        dense_below: sequences with fewer keys than this run dense attention (sequences
            of at most ``segment_size + force_local_blocks * key_block_size`` keys always do:
            every causal block is forced, there is nothing to skip).
        max_density: optional per-row budget: at most ``ceil(max_density * causal blocks)``
            blocks are computed per query-block row (forced blocks are never dropped).
        scoring_chunk: query blocks scored at once by the plain-torch antidiagonal path
            (bounds its memory to ``chunk * block_size / stride * L / stride`` floats per head).
        backend: who runs the planning stages (importance, antidiagonal scoring, selection):
            ``"auto"`` (fused Triton kernels on CUDA, plain torch elsewhere), ``"torch"`` or
            ``"triton"`` (also on CPU under ``TRITON_INTERPRET=1``, for tests).
        threshold_counts_forced: whether the forced blocks' score counts toward the threshold
            (default). ``False``: the threshold is a fraction of the mass of the other
            candidates only, so a row whose forced blocks hold most of its mass still selects
            its heaviest remaining blocks.
        scoring_fp8: the fused antidiagonal kernel multiplies in float8 e4m3 (Hopper GPUs):
            about 2x faster scoring; selections differ from bf16 in ~2% of blocks. Ignored
            by the plain-torch path.
    """

    block_size: int = 128
    key_block_size: int | None = 64
    segment_size: int = 512
    threshold: float = 0.9
    scoring: str = "antidiagonal"
    stride: int = 8
    peak_weight: float = 0.5
    permute: str = "auto"
    force_sink: bool = True
    dense_below: int = 0
    max_density: float | None = None
    scoring_chunk: int = 16
    backend: str = "auto"
    scoring_fp8: bool = False
    force_local_blocks: int = 8
    threshold_counts_forced: bool = True
    permute_gain: float = 2.0
    key_sort: str = "front"

    def __post_init__(self) -> None:
        _require_int("block_size", self.block_size, 16)
        if self.block_size % 16:
            raise ValueError(f"PBSConfig.block_size must be a multiple of 16, got {self.block_size}")
        if self.key_block_size is not None:
            _require_int("key_block_size", self.key_block_size, 16)
            if self.key_block_size % 16:
                raise ValueError(f"PBSConfig.key_block_size must be a multiple of 16, got {self.key_block_size}")
            if self.block_size % self.key_block_size:
                raise ValueError(
                    f"PBSConfig.key_block_size ({self.key_block_size}) must divide block_size "
                    f"({self.block_size}); pass key_block_size=None for square blocks"
                )
        _require_int("segment_size", self.segment_size, 1)
        if self.segment_size % self.block_size:
            raise ValueError(
                f"PBSConfig.segment_size ({self.segment_size}) must be a multiple of "
                f"block_size ({self.block_size})"
            )
        key_block = self.key_block_size or self.block_size
        _require_int("stride", self.stride, 1)
        if self.block_size % self.stride or key_block % self.stride:
            raise ValueError(
                f"PBSConfig.stride ({self.stride}) must divide block_size ({self.block_size}) "
                f"and key_block_size ({key_block})"
            )
        _require_fraction("threshold", self.threshold)
        _require_fraction("max_density", self.max_density, allow_none=True)
        if isinstance(self.peak_weight, bool) or not isinstance(self.peak_weight, (int, float)):
            raise TypeError(f"PBSConfig.peak_weight must be a float in [0, 1], got {self.peak_weight!r}")
        if not 0.0 <= float(self.peak_weight) <= 1.0:
            raise ValueError(f"PBSConfig.peak_weight must be in [0, 1], got {self.peak_weight}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"PBSConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.permute not in PERMUTES:
            raise ValueError(f"PBSConfig.permute must be one of {PERMUTES}, got {self.permute!r}")
        if self.key_sort not in KEY_SORTS:
            raise ValueError(f"PBSConfig.key_sort must be one of {KEY_SORTS}, got {self.key_sort!r}")
        if self.permute != "none" and self.segment_size < 2 * key_block:
            raise ValueError(
                f"PBSConfig(permute={self.permute!r}) needs segment_size >= 2 * key_block_size "
                f"(got {self.segment_size} with key blocks of {key_block}): keys sorted inside "
                f"one block stay in that block; the paper uses segment_size=256 with 128-blocks"
            )
        if isinstance(self.permute_gain, bool) or not isinstance(self.permute_gain, (int, float)):
            raise TypeError(f"PBSConfig.permute_gain must be a float >= 1, got {self.permute_gain!r}")
        if not 1.0 <= float(self.permute_gain) < float("inf"):
            raise ValueError(f"PBSConfig.permute_gain must be a finite float >= 1, got {self.permute_gain}")
        for flag in ("force_sink", "scoring_fp8", "threshold_counts_forced"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"PBSConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        _require_int("dense_below", self.dense_below, 0)
        _require_int("scoring_chunk", self.scoring_chunk, 1)
        _require_int("force_local_blocks", self.force_local_blocks, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"PBSConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PBSConfig":
        """Build a config from a mapping, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown PBSConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> "PBSConfig":
        """A copy with some fields changed (validated like the constructor)."""
        return PBSConfig.from_dict({**dataclasses.asdict(self), **changes})

    def is_dense_for(self, kv_len: int) -> bool:
        """Whether a sequence of ``kv_len`` keys falls back to dense attention: below
        ``dense_below``, or when the diagonal segment and the local window already cover every
        causal block (at most ``segment_size + force_local_blocks * key_block_size`` keys)."""
        forced_span = self.segment_size + self.force_local_blocks * (self.key_block_size or self.block_size)
        return kv_len <= forced_span or kv_len < self.dense_below
