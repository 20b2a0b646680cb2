"""flex_pbs: Permuted Block-Sparse Attention (PBS-Attn) on PyTorch FlexAttention."""

from .attention import PBSPlan, build_plan, pbs_attention
from .config import PBSConfig

__all__ = ["PBSConfig", "PBSPlan", "build_plan", "pbs_attention"]
__version__ = "0.1.0"
