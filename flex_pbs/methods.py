"""Named methods: every baseline is a configuration of the one PBS engine.

``dense`` is exact attention (no engine); the others differ in scoring, permutation and the
forced local window:

==============  ============  =======  ======  ==============================================
name            scoring       permute  local   what it is
==============  ============  =======  ======  ==============================================
``pbs``         antidiagonal  none     4       flex_pbs's default (``PBSConfig()``), measured best
``pbs_antidiagonal``  antidiagonal  key  0     PBS with XAttention's scoring (the permuted ``xattention``)
``pbs_mean``    mean          key      0       the PBS-Attn paper
``xattention``  antidiagonal  none     0       XAttention (block-sparse, no permutation)
``meanpool``    mean          none     0       mean-pooled block-sparse, no permutation
==============  ============  =======  ======  ==============================================

``local`` is ``force_local_blocks``. ``xattention`` and ``pbs_antidiagonal`` differ only in
the permutation; so do ``meanpool`` and ``pbs_mean``.
"""

from __future__ import annotations

from typing import Any

from .config import PBSConfig

METHODS: dict[str, PBSConfig | None] = {
    "dense": None,
    "pbs": PBSConfig(),
    "pbs_antidiagonal": PBSConfig(permute="key", force_local_blocks=0),
    "pbs_mean": PBSConfig(scoring="mean", permute="key", force_local_blocks=0),
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
