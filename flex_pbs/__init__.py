"""flex_pbs: Permuted Block-Sparse Attention (PBS-Attn) on PyTorch FlexAttention.

The core (``PBSConfig``, ``pbs_attention``, ``build_plan``) needs only torch. The transformers
adapter (``register``, ``unregister``, ``apply``, ``stats``) is imported on first use.
"""

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.pipeline import PBSPlan, build_plan, pbs_attention

__all__ = ["PBSConfig", "PBSPlan", "build_plan", "pbs_attention", "register", "unregister", "apply", "stats"]
__version__ = "0.1.0"

_ADAPTER = {"register", "unregister", "apply", "stats", "reset_stats", "registration", "PBSMask"}


def __getattr__(name: str):
    if name in _ADAPTER:
        from flex_pbs.integrations import transformers as adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'flex_pbs' has no attribute {name!r}")
