"""Stage 1, permute: sort keys inside segments by their importance to the last query block.

``permute_stage`` runs importance -> sort -> gather; the plain-torch functions below are the
reference of the fused kernels (``kernels.importance``, ``kernels.gather``). With
``permute="auto"`` a head keeps its sorted order only where :func:`sorting_pays`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.kernels import use_fused
from flex_pbs.engine.layout import BlockLayout, block_min_position
from flex_pbs.engine.select import forced_blocks, select_blocks

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


def _order_within_segments(importance: torch.Tensor, segment_size: int, local_order) -> torch.Tensor:
    """Key order with every complete segment reordered by ``local_order`` (``[..., n, S]``
    importances -> ``[..., n, S]`` positions inside each segment); the tail keeps its order."""
    batch, heads, kv_len = importance.shape
    n_full = kv_len // segment_size
    identity = torch.arange(kv_len, device=importance.device).expand(batch, heads, kv_len)
    if n_full == 0:
        return identity.clone()
    full = importance[..., : n_full * segment_size].reshape(batch, heads, n_full, segment_size)
    base = torch.arange(n_full, device=importance.device)[:, None] * segment_size
    sorted_part = (local_order(full) + base).reshape(batch, heads, n_full * segment_size)
    return torch.cat([sorted_part, identity[..., n_full * segment_size :]], dim=-1)


def segment_key_order(importance: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Sort keys by descending importance inside every complete segment.

    Args:
        importance: ``[B, Hkv, Lk]``.
        segment_size: tokens per segment; the incomplete tail segment keeps its order.

    Returns:
        long ``[B, Hkv, Lk]``: ``key_order[..., slot]`` is the original position of the key
        placed in ``slot``. Ties keep their original order (stable sort).
    """
    return _order_within_segments(
        importance, segment_size, lambda full: torch.sort(full, dim=-1, descending=True, stable=True).indices
    )


def blocks_needed(
    importance: torch.Tensor, key_order: torch.Tensor, layout: BlockLayout, config: PBSConfig
) -> torch.Tensor:
    """How many key blocks beyond the forced ones the selection rule keeps for the last query
    block if its block scores were its exact attention: long ``[B, Hkv]``.

    Args:
        importance: float32 ``[B, Hkv, Lk]``, the last query block's exact attention per key.
        key_order: long ``[B, Hkv, Lk]``, the key layout the blocks are cut from.
    """
    batch, heads, kv_len = importance.shape
    n_k = layout.num_kv_blocks
    mass = F.pad(importance.gather(-1, key_order), (0, n_k * layout.kv_block - kv_len))
    mass = mass.view(batch, heads, 1, n_k, layout.kv_block).sum(-1)  # [B, Hkv, 1, nK]
    _, last_query = layout.query_block_bounds(key_order.device)  # the last row of causal_blocks only
    candidates = (block_min_position(key_order, layout.kv_block) <= last_query[-1])[:, :, None, :]
    forced = forced_blocks(key_order, layout, config).expand(batch, heads, layout.num_q_blocks, n_k)[:, :, -1:]
    kept = select_blocks(mass, candidates, forced, config.threshold, counts_forced=config.threshold_counts_forced)
    return (kept & ~forced).flatten(1, 2).sum(-1)


def sorting_pays(
    importance: torch.Tensor, sorted_order: torch.Tensor, layout: BlockLayout, config: PBSConfig
) -> torch.Tensor:
    """The ``permute="auto"`` rule: bool ``[B, Hkv]``, True where sorting keys inside segments
    cuts the key blocks the last query block needs (:func:`blocks_needed`, exact) by at least
    ``config.permute_gain``. Where the forced blocks already hold the threshold mass nothing is
    needed either way, and the keys keep their order (and the locality earlier queries rely on)."""
    unsorted = blocks_needed(importance, identity_key_order(importance[..., None]), layout, config)
    needed_sorted = blocks_needed(importance, sorted_order, layout, config)
    return (unsorted > 0) & (unsorted >= config.permute_gain * needed_sorted)


def segment_front_key_order(importance: torch.Tensor, segment_size: int, front: int) -> torch.Tensor:
    """Move the ``front`` most important keys of every complete segment to its start.

    Args:
        importance: ``[B, Hkv, Lk]``.
        segment_size: tokens per segment; the incomplete tail segment keeps its order.
        front: keys moved per segment (a key block's worth), ``< segment_size``.

    Returns:
        long ``[B, Hkv, Lk]`` like :func:`segment_key_order`: inside a segment the moved keys come
        first and the others after them, each group in original order (ties for the last
        moved place go to the earlier key).
    """
    def moved_first(full: torch.Tensor) -> torch.Tensor:
        ranks = torch.sort(full, dim=-1, descending=True, stable=True).indices
        moved = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, ranks[..., :front], True)
        return torch.sort((~moved).to(torch.uint8), dim=-1, stable=True).indices

    return _order_within_segments(importance, segment_size, moved_first)


def sorted_key_order(importance: torch.Tensor, layout: BlockLayout, config: PBSConfig) -> torch.Tensor:
    """The permuted key order ``config.key_sort`` asks for: long ``[B, Hkv, Lk]``."""
    if config.key_sort == "front":
        return segment_front_key_order(importance, layout.segment_size, layout.kv_block)
    return segment_key_order(importance, layout.segment_size)


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


def order_stage(importance: torch.Tensor, layout: BlockLayout, config: PBSConfig) -> torch.Tensor:
    """The key order from the importance: long ``[B, Hkv, Lk]``, sorted inside segments as
    ``config.key_sort`` says; with ``permute="auto"`` only in the heads where :func:`sorting_pays`
    (the others keep the identity)."""
    key_order = sorted_key_order(importance, layout, config)
    if config.permute == "auto":
        permuted = sorting_pays(importance, key_order, layout, config)
        key_order = torch.where(permuted[..., None], key_order, identity_key_order(importance[..., None]))
    return key_order


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
    sort inside each segment (``config.key_sort``; with ``"auto"`` only in the heads where
    :func:`sorting_pays`), then the gather (``config.permute == "none"``: the identity)."""
    if config.permute == "none":
        return identity_key_order(k), k
    key_order = order_stage(importance_stage(q, k, layout, config, scale), layout, config)
    return key_order, gather_stage(k, key_order, config)
