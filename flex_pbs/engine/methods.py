"""Named methods: every baseline is a configuration of the one PBS engine.

``dense`` is exact attention (no engine); the others differ in scoring, permutation, block
shape and the forced local window:

====================  =================  =============  ========  =======  =====  ==============================
name                  scoring            permute        block     segment  local  what it is
====================  =================  =============  ========  =======  =====  ==============================
``pbs``               antidiagonal+peak  auto (front)   128 x 64  512      8      flex_pbs's default (``PBSConfig()``)
``pbs_unpermuted``    antidiagonal+peak  none           128 x 64  128      8      the default without permutation
``pbs_fast``          antidiagonal       none           128       128      4      speed first
``pbs_fine``          antidiagonal+peak  none           64        64       8      quality first: 64-token blocks
``pbs_antidiagonal``  antidiagonal       key (full)     128       256      0      PBS with XAttention's scoring
``pbs_mean``          mean               key (full)     128       256      0      the PBS-Attn paper
``xattention``        antidiagonal       none           128       128      0      XAttention (no permutation)
``meanpool``          mean               none           128       128      0      mean-pooled block-sparse
====================  =================  =============  ========  =======  =====  ==============================

``block`` is query x key tokens (one number: square blocks). ``antidiagonal+peak`` is
XAttention's strided estimate mixed half and half with the peak estimate (``peak_weight=0.5``:
the softmax of each antidiagonal's largest product, which keeps the single strong query-key
pairs that the mean of ``stride`` products dilutes). ``auto (front)``: keys are permuted only
in the heads where it cuts the last query block's needed key blocks by ``permute_gain``
(2x), and then only the segment's most important key block's worth moves to its front
(``key_sort="front"``); ``key (full)`` sorts every segment in every head, as the paper does.
``segment`` is ``segment_size`` (the diagonal segment is always computed), ``local`` is
``force_local_blocks`` in key blocks (512 tokens in every preset that has one).

``xattention`` keeps, per query-block row, the fewest blocks whose scores reach the threshold,
as the XAttention paper states; XAttention's reference code keeps one block more (its
cumulative sum is shifted by one). Comparisons at matched density are unaffected; thresholds
are not comparable one to one with the reference code's.

The permuted baselines sort keys inside 256-token segments, as in the paper; ``xattention`` and
``pbs_antidiagonal`` differ in the permutation and the segment (so do ``meanpool`` and
``pbs_mean``): ``method.segment_size=256`` gives the unpermuted methods the same diagonal
segment.
"""

from __future__ import annotations

from typing import Any

from flex_pbs.engine.config import PBSConfig

# The published baselines: square 128-token blocks, scored as in their papers.
_BASELINE = {"key_block_size": None, "peak_weight": 0.0, "force_local_blocks": 0}
# Keys in their original order, the diagonal segment one query block.
_UNPERMUTED = {"permute": "none", "segment_size": 128}
# The paper's permutation: every head, every segment fully sorted, 256-token segments.
_PAPER_PERMUTATION = {"permute": "key", "key_sort": "full", "segment_size": 256}

METHODS: dict[str, PBSConfig | None] = {
    "dense": None,
    "pbs": PBSConfig(),
    "pbs_unpermuted": PBSConfig(**_UNPERMUTED),
    "pbs_fast": PBSConfig(key_block_size=None, force_local_blocks=4, peak_weight=0.0, **_UNPERMUTED),
    "pbs_fine": PBSConfig(block_size=64, key_block_size=None, permute="none", segment_size=64),
    "pbs_antidiagonal": PBSConfig(**_PAPER_PERMUTATION, **_BASELINE),
    "pbs_mean": PBSConfig(scoring="mean", **_PAPER_PERMUTATION, **_BASELINE),
    "xattention": PBSConfig(**_UNPERMUTED, **_BASELINE),
    "meanpool": PBSConfig(scoring="mean", **_UNPERMUTED, **_BASELINE),
}


def method_config(name: str, **overrides: Any) -> PBSConfig | None:
    """The engine config of a named method with some fields changed (None for ``dense``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    preset = METHODS[name]
    if preset is None:
        if overrides:
            raise ValueError(f"method 'dense' takes no engine options, got {sorted(overrides)}")
        return None
    return preset.replace(**overrides) if overrides else preset
