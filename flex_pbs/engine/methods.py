"""Named methods: every baseline is a configuration of the one PBS engine.

``dense`` is exact attention (no engine); the others differ in scoring, permutation, block
shape and the forced local window:

====================  =================  =======  ========  =======  =====  ==============================
name                  scoring            permute  block     segment  local  what it is
====================  =================  =======  ========  =======  =====  ==============================
``pbs``               antidiagonal+peak  none     128 x 64  128      8      flex_pbs's default (``PBSConfig()``)
``pbs_fast``          antidiagonal       none     128       128      4      speed first: about 1.4x
                                                                            faster per call
``pbs_fine``          antidiagonal+peak  none     64        64       8      quality first: 64-token blocks
``pbs_antidiagonal``  antidiagonal       key      128       256      0      PBS with XAttention's scoring
``pbs_mean``          mean               key      128       256      0      the PBS-Attn paper
``xattention``        antidiagonal       none     128       128      0      XAttention (no permutation)
``meanpool``          mean               none     128       128      0      mean-pooled block-sparse
====================  =================  =======  ========  =======  =====  ==============================

``block`` is query x key tokens (one number: square blocks). ``antidiagonal+peak`` is
XAttention's strided estimate mixed half and half with the peak estimate (``peak_weight=0.5``:
the softmax of each antidiagonal's largest product, which keeps the single strong query-key
pairs that the mean of ``stride`` products dilutes). ``segment`` is ``segment_size`` (equal to
the query block = the diagonal block alone), ``local`` is ``force_local_blocks`` in key blocks
(512 tokens in ``pbs``, ``pbs_fast`` and ``pbs_fine``). On the bundled model ``pbs`` and
``pbs_fine`` stay within +1% of dense perplexity at density 0.25 at 8K where ``pbs_fast`` does
not; on an H100 at 128K and equal density an attention call of ``pbs`` takes about 1.4x
``pbs_fast``'s time, ``pbs_fine`` (64-row FlexAttention tiles) about 2x (docs/results.md).
The baselines keep square blocks and XAttention's or the paper's scoring.

The permuted methods sort keys inside 256-token segments, as in the paper; ``xattention`` and
``pbs_antidiagonal`` differ in the permutation and the segment (so do ``meanpool`` and
``pbs_mean``): ``method.segment_size=256`` gives the unpermuted methods the same diagonal
segment.
"""

from __future__ import annotations

from typing import Any

from flex_pbs.engine.config import PBSConfig

# The published baselines: square 128-token blocks, scored as in their papers.
_BASELINE = {"key_block_size": None, "peak_weight": 0.0, "force_local_blocks": 0}

METHODS: dict[str, PBSConfig | None] = {
    "dense": None,
    "pbs": PBSConfig(),
    "pbs_fast": PBSConfig(key_block_size=None, force_local_blocks=4, peak_weight=0.0),
    "pbs_fine": PBSConfig(block_size=64, segment_size=64, key_block_size=None),
    "pbs_antidiagonal": PBSConfig(permute="key", segment_size=256, **_BASELINE),
    "pbs_mean": PBSConfig(scoring="mean", permute="key", segment_size=256, **_BASELINE),
    "xattention": PBSConfig(permute="none", **_BASELINE),
    "meanpool": PBSConfig(scoring="mean", permute="none", **_BASELINE),
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
