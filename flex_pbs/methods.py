"""Named methods: every baseline is a configuration of the one PBS engine.

``dense`` is exact attention (no engine); the others differ only in scoring and permutation:

=============  ==============  ===========  =====================================
name           scoring         permute      what it is
=============  ==============  ===========  =====================================
``pbs``        antidiagonal    key          flex_pbs's default
``pbs_mean``   mean            key          the PBS-Attn paper
``xattention`` antidiagonal    none         XAttention (block-sparse, no permutation)
``meanpool``   mean            none         mean-pooled block-sparse, no permutation
=============  ==============  ===========  =====================================
"""

from __future__ import annotations

from typing import Any

from .config import PBSConfig

METHODS: dict[str, PBSConfig | None] = {
    "dense": None,
    "pbs": PBSConfig(),
    "pbs_mean": PBSConfig(scoring="mean"),
    "xattention": PBSConfig(permute="none"),
    "meanpool": PBSConfig(scoring="mean", permute="none"),
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
