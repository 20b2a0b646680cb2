"""Stage 1, permute: sort keys inside segments by their importance to the last query block.

``permute_stage`` runs importance -> sort -> gather; the plain-torch functions below are the
reference of the fused kernels (``kernels.importance``, ``kernels.gather``).
"""

from __future__ import annotations

import torch

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.kernels import use_fused
from flex_pbs.engine.layout import BlockLayout

# Keys per chunk when computing importance: bounds memory to G * block_size * chunk floats.
_IMPORTANCE_KEY_CHUNK = 16384


def key_importance(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, q_offset: int = 0
) -> torch.Tensor:
    """Attention of the last query block to every key, averaged over queries and the GQA group.

    Args:
        q: ``[B, Hq, Lq, D]``; query ``i`` sits at absolute position ``q_offset + i``.
        k: ``[B, Hkv, Lk, D]``.
        block_size: how many of the last queries define importance.
        scale: softmax scale.

    Returns:
        float32 ``[B, Hkv, Lk]``: mean over the last ``block_size`` queries (and over the query
        heads sharing each KV head) of ``softmax(q · kᵀ · scale)`` with causal masking.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    n_last = min(block_size, q_len)
    wide = q.dtype == torch.float16  # raw q·k sums may pass float16's 65504: multiply in float32
    last = q[:, :, q_len - n_last :, :].reshape(batch, kv_heads, group * n_last, dim)
    last = last.float() if wide else last
    positions = (torch.arange(q_len - n_last, q_len, device=q.device) + q_offset).repeat(group)

    def masked_logits(start: int, stop: int) -> torch.Tensor:
        keys = k[:, :, start:stop, :]
        logits = torch.matmul(last, (keys.float() if wide else keys).transpose(-1, -2)).float() * scale
        key_positions = torch.arange(start, stop, device=q.device)
        return logits.masked_fill(key_positions[None, :] > positions[:, None], float("-inf"))

    chunks = [(s, min(s + _IMPORTANCE_KEY_CHUNK, kv_len)) for s in range(0, kv_len, _IMPORTANCE_KEY_CHUNK)]
    lse = torch.stack([torch.logsumexp(masked_logits(s, e), dim=-1) for s, e in chunks]).logsumexp(dim=0)
    return torch.cat(
        [torch.exp(masked_logits(s, e) - lse[..., None]).mean(dim=-2) for s, e in chunks], dim=-1
    )


def segment_key_order(importance: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Sort keys by descending importance inside every complete segment.

    Args:
        importance: ``[B, Hkv, Lk]``.
        segment_size: tokens per segment; the incomplete tail segment keeps its order.

    Returns:
        long ``[B, Hkv, Lk]``: ``key_order[..., slot]`` is the original position of the key
        placed in ``slot``. Ties keep their original order (stable sort).
    """
    batch, heads, kv_len = importance.shape
    n_full = kv_len // segment_size
    identity = torch.arange(kv_len, device=importance.device).expand(batch, heads, kv_len)
    if n_full == 0:
        return identity.clone()
    full = importance[..., : n_full * segment_size].reshape(batch, heads, n_full, segment_size)
    local = torch.sort(full, dim=-1, descending=True, stable=True).indices
    base = torch.arange(n_full, device=importance.device)[:, None] * segment_size
    sorted_part = (local + base).reshape(batch, heads, n_full * segment_size)
    return torch.cat([sorted_part, identity[..., n_full * segment_size :]], dim=-1)


def identity_key_order(k: torch.Tensor) -> torch.Tensor:
    """The unpermuted order: long ``[B, Hkv, Lk]``."""
    batch, heads, kv_len, _ = k.shape
    return torch.arange(kv_len, device=k.device).expand(batch, heads, kv_len).clone()


def permute_keys(x: torch.Tensor, key_order: torch.Tensor) -> torch.Tensor:
    """Gather keys (or values) into the permuted layout: ``[B, Hkv, Lk, D]`` -> same shape."""
    return torch.gather(x, 2, key_order[..., None].expand(-1, -1, -1, x.shape[-1]))


def importance_stage(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, config: PBSConfig, scale: float) -> torch.Tensor:
    """Each key's attention from the last query block: float32 ``[B, Hkv, Lk]``."""
    if use_fused(q, config.backend):
        from flex_pbs.engine.kernels import importance

        if importance.supports(q):
            return importance.key_importance_fused(q, k, layout.block_size, scale, layout.q_offset)
    return key_importance(q, k, layout.block_size, scale, layout.q_offset)


def gather_stage(x: torch.Tensor, key_order: torch.Tensor, config: PBSConfig) -> torch.Tensor:
    """Keys or values ``[B, Hkv, Lk, D]`` into the permuted layout (same shape)."""
    if use_fused(x, config.backend):
        from flex_pbs.engine.kernels import gather

        if gather.supports(x):
            return gather.permute_keys_fused(x, key_order)
    return permute_keys(x, key_order)


def permute_stage(
    q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, config: PBSConfig, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: ``(key_order long [B, Hkv, Lk], k_perm [B, Hkv, Lk, D])``: importance, then a
    sort inside each segment, then the gather (``config.permute == "none"``: the identity)."""
    if config.permute == "none":
        return identity_key_order(k), k
    key_order = segment_key_order(importance_stage(q, k, layout, config, scale), layout.segment_size)
    return key_order, gather_stage(k, key_order, config)
