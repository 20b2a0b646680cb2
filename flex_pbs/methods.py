"""Named methods: every baseline is a configuration of the one PBS engine.

``dense`` is exact attention (no engine); the others differ in scoring, permutation and the
forced local window:

====================  ============  =======  =======  =====  ===========================================
name                  scoring       permute  segment  local  what it is
====================  ============  =======  =======  =====  ===========================================
``pbs``               antidiagonal  none     128      4      flex_pbs's default (``PBSConfig()``), measured best
``pbs_fine``          antidiagonal  none     64       8      64-token blocks, stride 2: quality first
``pbs_antidiagonal``  antidiagonal  key      256      0      PBS with XAttention's scoring
``pbs_mean``          mean          key      256      0      the PBS-Attn paper
``xattention``        antidiagonal  none     128      0      XAttention (block-sparse, no permutation)
``meanpool``          mean          none     128      0      mean-pooled block-sparse, no permutation
====================  ============  =======  =======  =====  ===========================================

``segment`` is ``segment_size`` (128 = the diagonal block alone), ``local`` is
``force_local_blocks``. ``pbs_fine`` halves the block (its local window is the same 512 tokens)
and samples four times as many antidiagonals (``stride=2``): on the bundled model at 8K it loses
+0.95% perplexity at density 0.25 on code where ``pbs`` loses +1.65%, but on an H100 its 64-row
tiles and denser scoring take about 2.7x ``pbs``'s time at equal density (README, "Quality").

The permuted methods sort keys inside 256-token segments, as in the paper; ``xattention`` and ``pbs_antidiagonal`` differ in the permutation and the segment (so
do ``meanpool`` and ``pbs_mean``): ``method.segment_size=256`` gives the unpermuted methods the
same diagonal segment.
"""

from __future__ import annotations

from typing import Any

from .config import PBSConfig

METHODS: dict[str, PBSConfig | None] = {
    "dense": None,
    "pbs": PBSConfig(),
    "pbs_fine": PBSConfig(block_size=64, segment_size=64, force_local_blocks=8, stride=2),
    "pbs_antidiagonal": PBSConfig(permute="key", segment_size=256, force_local_blocks=0),
    "pbs_mean": PBSConfig(scoring="mean", permute="key", segment_size=256, force_local_blocks=0),
    "xattention": PBSConfig(permute="none", force_local_blocks=0),
    "meanpool": PBSConfig(scoring="mean", permute="none", force_local_blocks=0),
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
