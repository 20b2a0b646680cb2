"""`pbs_attention`: permute → score → select → BlockMask → attend → restore order.

Each stage is a function of its own module (``permute``, ``score``, ``select``, ``mask``,
``attend``) reading its geometry from one :class:`~flex_pbs.engine.layout.BlockLayout`. Only
keys (and values with them) are permuted, so the output is already in the caller's query order:
the "restore order" stage is the identity, and exactness of the diagonal segment comes from the
mask_mod comparing original key positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from flex_pbs.engine.attend import flex_attend
from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.mask import build_stage
from flex_pbs.engine.permute import gather_stage, identity_key_order, permute_stage
from flex_pbs.engine.score import score_stage
from flex_pbs.engine.select import select_stage


@dataclass(frozen=True)
class PBSPlan:
    """Which blocks one PBS call computes, and in which key layout.

    Attributes:
        block_mask: bool ``[B, Hq, nQ, nK]``, True = block computed, permuted key layout.
        key_order: long ``[B, Hkv, Lk]``, original position of each key slot.
        block_scores: float32 ``[B, Hq, nQ, nK]`` estimate used for selection (None when dense).
        flex_mask: the BlockMask handed to ``flex_attention`` (None when the input ran dense).
            On CPU it is built at the padded length bucket the kernel runs at.
        layout: block geometry.
        dense: True when the input was short enough to run dense attention.

    ``causal_blocks`` (bool ``[B, Hkv, nQ, nK]``, blocks holding a key visible to the query block:
    the denominator of the density) is computed on first use: attention does not need it.
    """

    block_mask: torch.Tensor
    key_order: torch.Tensor
    block_scores: torch.Tensor | None
    flex_mask: BlockMask | None
    layout: BlockLayout
    dense: bool = False

    @cached_property
    def causal_blocks(self) -> torch.Tensor:
        """bool ``[B, Hkv, nQ, nK]``: blocks holding at least one key visible to the query block."""
        return self.layout.causal_blocks(self.key_order)

    @property
    def head_density(self) -> torch.Tensor:
        """Computed causal blocks / causal blocks, per batch element and query head: ``[B, Hq]``."""
        batch, q_heads = self.block_mask.shape[:2]
        kv_heads = self.causal_blocks.shape[1]
        computed = self.block_mask.reshape(batch, kv_heads, q_heads // kv_heads, -1).sum(-1)
        causal = self.causal_blocks.reshape(batch, kv_heads, 1, -1).sum(-1)
        return (computed / causal).reshape(batch, q_heads)

    @property
    def density(self) -> float:
        """Computed causal blocks / all causal blocks, over batch and heads."""
        group = self.block_mask.shape[1] // self.causal_blocks.shape[1]
        return float(self.block_mask.sum()) / float(self.causal_blocks.sum() * group)

    def token_mask(self) -> torch.Tensor:
        """Which keys each query attends to under this plan, in the caller's key order:
        bool ``[B, Hq, Lq, Lk]``, True where the key's block is computed and the key is causal.

        Exact attention with this mask (``F.scaled_dot_product_attention(q, k, v,
        attn_mask=plan.token_mask(), enable_gqa=True)``) is what PBS attention computes, permuted
        or not: the reference that checks a kernel against its plan. O(Lq * Lk) memory.
        """
        layout, key_order = self.layout, self.key_order
        batch, q_heads = self.block_mask.shape[:2]
        group = q_heads // key_order.shape[1]
        slots = (
            self.block_mask.repeat_interleave(layout.block_size, dim=2)[:, :, : layout.q_len]
            .repeat_interleave(layout.kv_block, dim=3)[..., : layout.kv_len]
        )
        positions = torch.arange(layout.q_len, device=key_order.device) + layout.q_offset
        original = key_order.repeat_interleave(group, dim=1)[:, :, None, :]
        slots &= original <= positions[:, None]
        return torch.zeros_like(slots).scatter_(-1, original.expand_as(slots), slots)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    scale: float | None,
    q_offset: int,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem with attention inputs."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must share a dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} must be on one device, got {q.device} and {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"batch size of q ({q.shape[0]}) and {name} ({t.shape[0]}) differ")
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"head dim of q ({q.shape[-1]}) and {name} ({t.shape[-1]}) differ")
    if v is not None and v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"k and v must have the same heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise TypeError(f"q_offset must be a non-negative int, got {q_offset!r}")
    if q_offset + q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} positions and k has {k.shape[2]}: queries must be the last "
            f"positions of the keys; pass q_offset={k.shape[2] - q.shape[2]} for chunked prefill"
            if q.shape[2] < k.shape[2] and q_offset == 0
            else f"q_offset ({q_offset}) + query length ({q.shape[2]}) must equal key length ({k.shape[2]})"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int = 0
) -> torch.Tensor:
    """Exact causal attention with queries at the end of the keys: ``[B, Hq, Lq, D]``."""
    gqa = q.shape[1] != k.shape[1]
    if q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    positions = torch.arange(q.shape[2], device=q.device) + q_offset
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)


def _dense_plan(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> PBSPlan:
    key_order = identity_key_order(k)
    group = q.shape[1] // k.shape[1]
    return PBSPlan(
        block_mask=layout.causal_blocks(key_order).repeat_interleave(group, dim=1),
        key_order=key_order,
        block_scores=None,
        flex_mask=None,
        layout=layout,
        dense=True,
    )


def _plan_with_keys(
    q: torch.Tensor, k: torch.Tensor, config: PBSConfig, scale: float, q_offset: int
) -> tuple[PBSPlan, torch.Tensor]:
    """The plan and the permuted keys (so that attention does not gather them twice)."""
    layout = BlockLayout.from_config(config, q.shape[2], k.shape[2], q_offset)
    if config.is_dense_for(k.shape[2]):
        return _dense_plan(q, k, layout), k
    key_order, k_perm = permute_stage(q, k, layout, config, scale)
    scores = score_stage(q, k_perm, key_order, layout, config, scale)
    selected, indices = select_stage(scores, key_order, layout, config)
    flex_mask = build_stage(indices, key_order, layout, permuted=config.permute != "none")
    return PBSPlan(selected, key_order, scores, flex_mask, layout), k_perm


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PBSConfig | None = None,
    *,
    scale: float | None = None,
    q_offset: int = 0,
) -> PBSPlan:
    """Plan which blocks PBS attention computes, without running attention.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k: ``[B, Hkv, Lk, D]``; ``Hq`` a multiple of ``Hkv``.
        config: defaults to ``PBSConfig()``.
        scale: softmax scale, default ``1/sqrt(D)``.
        q_offset: position of the first query among the keys; queries must be the last
            ``Lq`` positions (``Lk - Lq``, for chunked prefill).
    """
    config = config or PBSConfig()
    check_inputs(q, k, None, scale, q_offset)
    return _plan_with_keys(q, k, config, _default_scale(q, scale), q_offset)[0]


def pbs_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: PBSConfig | None = None,
    *,
    scale: float | None = None,
    q_offset: int = 0,
    return_plan: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PBSPlan]:
    """Causal permuted block-sparse attention.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k, v: ``[B, Hkv, Lk, D]``; ``Hq`` a multiple of ``Hkv`` (GQA without copies).
        config: defaults to ``PBSConfig()``.
        scale: softmax scale, default ``1/sqrt(D)`` (as in SDPA).
        q_offset: position of the first query among the keys (``Lk - Lq`` for chunked
            prefill; queries must be the last ``Lq`` positions).
        return_plan: also return the :class:`PBSPlan`.

    Returns:
        ``[B, Hq, Lq, D]`` in the caller's query order (and the plan if asked).
    """
    config = config or PBSConfig()
    check_inputs(q, k, v, scale, q_offset)
    scale = _default_scale(q, scale)
    plan, k_perm = _plan_with_keys(q, k, config, scale, q_offset)
    if plan.dense:
        out = dense_causal_attention(q, k, v, scale, q_offset)
        return (out, plan) if return_plan else out
    v_perm = v if config.permute == "none" else gather_stage(v, plan.key_order, config)  # values follow keys
    flex_mask = plan.flex_mask
    if not return_plan:
        del plan  # block scores and masks are not needed while attending
    out = flex_attend(q, k_perm, v_perm, flex_mask, scale, keys_in_order=config.permute == "none")
    return (out, plan) if return_plan else out
