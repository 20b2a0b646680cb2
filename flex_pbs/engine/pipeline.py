"""`pbs_attention`: permute → score → select → BlockMask → attend → restore order.

Each stage is a function of its own module (``permute``, ``score``, ``select``, ``mask``,
``attend``) reading its geometry from one :class:`~flex_pbs.engine.layout.BlockLayout`. Only
keys (and values with them) are permuted, so the output is already in the caller's query order:
the "restore order" stage is the identity, and exactness of the diagonal segment comes from the
mask_mod comparing original key positions.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from flex_pbs.engine.attend import CompileBudgetSpent, default_kernel_options, flex_attend
from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.mask import build_stage, differentiable_flex_mask
from flex_pbs.engine.permute import (
    gather_stage,
    identity_key_order,
    permute_keys,
    permute_stage,
)
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
        computed = self.block_mask.flatten(2).sum(-1).reshape(batch, kv_heads, q_heads // kv_heads)
        causal = self.causal_blocks.flatten(2).sum(-1).reshape(batch, kv_heads, 1)
        # No causal block (no queries): nothing was skipped.
        return torch.where(causal > 0, computed / causal.clamp(min=1), 1.0).reshape(batch, q_heads)

    @property
    def permuted_heads(self) -> torch.Tensor:
        """bool ``[B, Hkv]``: True where the plan moved keys out of their original order."""
        return (self.key_order != torch.arange(self.layout.kv_len, device=self.key_order.device)).any(-1)

    @property
    def density(self) -> float:
        """Computed causal blocks / all causal blocks, over batch and heads."""
        group = self.block_mask.shape[1] // self.causal_blocks.shape[1]
        causal = float(self.causal_blocks.sum() * group)
        return float(self.block_mask.sum()) / causal if causal else 1.0  # no queries: nothing skipped

    def token_mask(self, rows: slice | None = None) -> torch.Tensor:
        """Which keys each query attends to under this plan, in the caller's key order:
        bool ``[B, Hq, Lq, Lk]`` (``rows``: only those query rows), True where the key's block
        is computed and the key is causal.

        Exact attention with this mask (``F.scaled_dot_product_attention(q, k, v,
        attn_mask=plan.token_mask(), enable_gqa=True)``) is what PBS attention computes, permuted
        or not: the reference that checks a kernel against its plan. O(Lq * Lk) memory.
        """
        layout, key_order = self.layout, self.key_order
        rows = range(layout.q_len)[rows or slice(None)]
        group = self.block_mask.shape[1] // key_order.shape[1]
        queries = torch.arange(rows.start, rows.stop, device=key_order.device)
        slots = self.block_mask[:, :, queries // layout.block_size].repeat_interleave(layout.kv_block, dim=3)
        slots = slots[..., : layout.kv_len]
        original = key_order.repeat_interleave(group, dim=1)[:, :, None, :]
        slots &= original <= (queries + layout.q_offset)[:, None]
        return torch.zeros_like(slots).scatter_(-1, original.expand_as(slots), slots)


# The dtypes FlexAttention's kernels (and the fused planning kernels) compute in.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} is {t.dtype}; flex_pbs computes in float32, bfloat16 or float16 (FlexAttention's "
                f"kernels): cast the inputs first, e.g. q.float()"
            )
        if t.shape[1] == 0:
            raise ValueError(f"{name} must have at least one head, got shape {tuple(t.shape)}")
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
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


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


# Elements of a temporary that a chunked pass holds at once: the token mask of
# :func:`plan_restricted_attention`, the block and finiteness tests of :func:`non_finite_rows`.
_CHUNK_ELEMENTS = 1 << 26


def plan_restricted_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan, scale: float
) -> torch.Tensor:
    """Exact attention restricted to the plan's computed blocks (what the sparse kernel
    computes), through SDPA with the plan's token mask, a chunk of query rows at a time:
    ``[B, Hq, Lq, D]``. Memory O(B * Hq * chunk * Lk); time O(Lq * Lk), like dense attention.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` in the caller's key order.
    """
    batch, q_heads, q_len, _ = q.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * q_heads * k.shape[2]))
    gqa = q_heads != k.shape[1]
    chunks = [
        F.scaled_dot_product_attention(
            q[:, :, start : start + rows], k, v, attn_mask=plan.token_mask(slice(start, start + rows)),
            scale=scale, enable_gqa=gqa,
        )
        for start in range(0, q_len, rows)
    ]
    return torch.cat(chunks, dim=2)


def _non_finite_vectors(x: torch.Tensor) -> torch.Tensor:
    """``~isfinite(x).all(-1)``: bool ``[B, H, L]`` for ``x: [B, H, L, D]``, a chunk of rows at a
    time: ``isfinite`` holds an ``|x|`` copy and three bool masks, 2.5x a 16-bit input (2.5 GiB
    for 128K queries, 32 heads, head_dim 128, measured on an H200)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1] * x.shape[3]))
    return torch.cat([~torch.isfinite(part).all(dim=-1) for part in x.split(rows, dim=2)], dim=2)


def non_finite_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PBSPlan) -> torch.Tensor:
    """Rows SDPA restricted to the plan returns as NaN: bool ``[B, Hq, Lq, 1]``.

    A row is NaN when its query is not finite, or when a key or value it attends (a key in one
    of its computed blocks, causal) is not finite. FlexAttention's CPU kernel returns zeros for a
    NaN query row and finite values for a NaN key inside a partial block, so PBS marks these rows
    itself: a NaN in is a NaN out. Reads Q, K and V once; no host synchronisation.
    """
    layout = plan.layout
    group = q.shape[1] // k.shape[1]
    bad_query = _non_finite_vectors(q)
    bad_key = _non_finite_vectors(k) | _non_finite_vectors(v)  # [B, Hkv, Lk], caller order
    rows = torch.arange(layout.q_len, device=q.device)
    # Full blocks (outside the diagonal segment): every query of the block sees every key in it.
    bad_block = bad_key.gather(-1, plan.key_order)
    bad_block = F.pad(bad_block, (0, layout.num_kv_blocks * layout.kv_block - layout.kv_len))
    bad_block = bad_block.view(*bad_block.shape[:2], layout.num_kv_blocks, layout.kv_block).any(-1)
    bad_block = bad_block.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, Hq, 1, nK]
    outside_diagonal = ~layout.diagonal_blocks(q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * layout.num_kv_blocks))
    full_hit = torch.cat([  # query blocks in chunks: no [B, Hq, nQ, nK] temporary at long lengths
        (plan.block_mask[:, :, start : start + chunk] & bad_block & outside_diagonal[start : start + chunk]).any(-1)
        for start in range(0, layout.num_q_blocks, chunk)
    ], dim=2)[:, :, rows // layout.block_size]
    # The diagonal segment, always computed, token-causal: a bad key between the segment's start
    # and the row (original positions) reaches it.
    bad_before = F.pad(bad_key.to(torch.int32).cumsum(-1), (1, 0))  # bad keys before each position
    position = rows + layout.q_offset
    segment_start = (layout.q_offset + rows // layout.block_size * layout.block_size) // layout.segment_size
    diagonal_hit = (bad_before[..., position + 1] - bad_before[..., segment_start * layout.segment_size]) > 0
    return (bad_query | full_hit | diagonal_hit.repeat_interleave(group, dim=1))[..., None]


_warned_budget_spent = False


def _attend_or_fall_back(q, k, v, k_perm, v_perm, plan: PBSPlan, scale: float, keys_in_order: bool) -> torch.Tensor:
    """Stage 5 on the plan's BlockMask; once the process's CPU compile budget is spent, the same
    result through :func:`plan_restricted_attention` (warned once per process)."""
    global _warned_budget_spent
    try:
        return flex_attend(q, k_perm, v_perm, plan.flex_mask, scale, keys_in_order=keys_in_order)
    except CompileBudgetSpent as error:
        if not _warned_budget_spent:
            _warned_budget_spent = True
            warnings.warn(
                f"{error}: this call and later new shapes run exact attention restricted to the plan "
                "(same result, dense time and O(chunk x Lk) memory)", RuntimeWarning, stacklevel=3,
            )
        return plan_restricted_attention(q, k, v, plan, scale)


# The CPU gradient path holds a [B, Hq, rows, Lk] mask per chunk and, for backward, the
# attention weights of every query: O(Lq * Lk) memory per head. Refused above this many keys.
CPU_GRAD_MAX_KEYS = 16384


def _differentiable_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig, scale: float, q_offset: int
) -> tuple[torch.Tensor, PBSPlan]:
    """PBS attention that autograd differentiates with respect to ``q``, ``k`` and ``v``: the
    plan (importance, permutation, scores, selection) is made without grad, and no gradient
    flows into which blocks are chosen; attention over the chosen keys is differentiable. On
    CUDA through FlexAttention's backward (the gather of the keys into the kernel's layout is
    differentiable; the mask's blocks are ones the backward can tile); on CPU, where
    FlexAttention has no backward, as exact attention restricted to the plan."""
    sparse = not (config.is_dense_for(k.shape[2]) or _empty(q, k))
    if sparse and not q.is_cuda and k.shape[2] > CPU_GRAD_MAX_KEYS:
        raise ValueError(
            f"gradients through flex_pbs on CPU hold O(Lq x Lk) attention weights per head; {k.shape[2]} keys is "
            f"more than the {CPU_GRAD_MAX_KEYS} allowed (flex_pbs.engine.pipeline.CPU_GRAD_MAX_KEYS): use "
            "shorter sequences for training on CPU, or a GPU"
        )
    with torch.no_grad():
        plan = _plan_with_keys(q.detach(), k.detach(), config, scale, q_offset)[0]
    if plan.dense:
        return dense_causal_attention(q, k, v, scale, q_offset), plan
    if not q.is_cuda:
        return plan_restricted_attention(q, k, v, plan, scale), plan
    permuted = config.permute != "none"
    with torch.no_grad():
        mask = differentiable_flex_mask(plan.block_mask, plan.key_order if permuted else None, plan.layout)
    if mask.key_slots is None:
        k_in, v_in = k, v
    else:  # differentiable: the gather's backward sums each key's gradient over its slots
        slots = mask.key_slots.expand(k.shape[0], k.shape[1], -1)
        k_in, v_in = permute_keys(k, slots), permute_keys(v, slots)
    # Keeps the fully-masked-row guard: a block may hold no key some of its rows see.
    options = default_kernel_options(q, mask.block_mask, backward=True, mask_gathers=mask.reads_selection)
    out = flex_attend(q, k_in, v_in, mask.block_mask, scale, kernel_options=options)
    return out.masked_fill(non_finite_rows(q, k, v, plan), float("nan")), plan


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
    if config.is_dense_for(k.shape[2]) or _empty(q, k):
        return _dense_plan(q, k, layout), k
    key_order, k_perm = permute_stage(q, k, layout, config, scale)
    scores = score_stage(q, k_perm, key_order, layout, config, scale)
    selected, indices = select_stage(scores, key_order, layout, config)
    flex_mask = build_stage(indices, key_order, layout, permuted=config.permute != "none")
    return PBSPlan(selected, key_order, scores, flex_mask, layout), k_perm


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(max(q.shape[-1], 1))


def config_of(config: PBSConfig | Mapping[str, Any] | None) -> PBSConfig:
    """``config`` as a :class:`PBSConfig`: None is the default, a mapping names fields."""
    if config is None:
        return PBSConfig()
    if isinstance(config, PBSConfig):
        return config
    if isinstance(config, Mapping):
        return PBSConfig.from_dict(config)
    raise TypeError(f"config must be a PBSConfig, a mapping of its fields or None, got {type(config).__name__}")


def _empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No output element to compute (batch, queries or head dim is 0): SDPA returns an empty
    tensor, and so does PBS."""
    return q.shape[0] == 0 or q.shape[2] == 0 or q.shape[3] == 0


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
        config: a :class:`PBSConfig`, a mapping of its fields, or None (``PBSConfig()``).
        scale: softmax scale, default ``1/sqrt(D)``.
        q_offset: position of the first query among the keys; queries must be the last
            ``Lq`` positions (``Lk - Lq``, for chunked prefill).
    """
    config = config_of(config)
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

    Differentiable with respect to ``q``, ``k`` and ``v`` (CUDA: FlexAttention's backward; CPU:
    exact attention restricted to the plan, up to :data:`CPU_GRAD_MAX_KEYS` keys). The selection,
    which blocks are computed, is not differentiable: no gradient flows into it.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k, v: ``[B, Hkv, Lk, D]``; ``Hq`` a multiple of ``Hkv`` (GQA without copies).
        config: a :class:`PBSConfig`, a mapping of its fields, or None (``PBSConfig()``).
        scale: softmax scale, default ``1/sqrt(D)`` (as in SDPA).
        q_offset: position of the first query among the keys (``Lk - Lq`` for chunked
            prefill; queries must be the last ``Lq`` positions).
        return_plan: also return the :class:`PBSPlan`.

    Returns:
        ``[B, Hq, Lq, D]`` in the caller's query order (and the plan if asked).
    """
    config = config_of(config)
    check_inputs(q, k, v, scale, q_offset)
    scale = _default_scale(q, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, plan = _differentiable_attention(q, k, v, config, scale, q_offset)
        return (out, plan) if return_plan else out
    plan, k_perm = _plan_with_keys(q, k, config, scale, q_offset)
    if plan.dense:
        out = q.new_empty(q.shape) if _empty(q, k) else dense_causal_attention(q, k, v, scale, q_offset)
        return (out, plan) if return_plan else out
    v_perm = v if config.permute == "none" else gather_stage(v, plan.key_order, config)  # values follow keys
    attending = plan if return_plan else dataclasses.replace(plan, block_scores=None)  # scores not needed now
    del plan
    out = _attend_or_fall_back(q, k, v, k_perm, v_perm, attending, scale, keys_in_order=config.permute == "none")
    out.masked_fill_(non_finite_rows(q, k, v, attending), float("nan"))
    return (out, attending) if return_plan else out
