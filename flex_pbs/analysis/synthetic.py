"""Planted-structure Q/K/V: attention with a known sparse shape, for tests and benchmarks.

Each KV head gets four planted patterns, written into dedicated channels so that the logit of
query ``i`` and key ``j`` (after the ``1/sqrt(D)`` softmax scale) is approximately::

    sink_logit            if j == 0                       (attention sink)
  + heavy_logit           if j is a heavy-hitter key      (scattered, shared by all queries)
  + local_logit * w(i-j)                                  (local window, w(0) = 1, decays by ~window)
  + slash_logit * cos(2π (i-j) / slash_period)            (slash lines, off when slash_logit = 0)
  + small Gaussian noise

Heavy-hitter keys are drawn uniformly at random (a fraction ``heavy_fraction`` of positions,
different per KV head), which is exactly the scattered pattern that block-sparse attention
handles worst and that PBS's segment-local permutation gathers. Query heads of one GQA group
share their KV head's pattern with independent noise. Values are standard Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlantedPattern:
    """Strengths of the planted patterns, in logits (after the softmax scale)."""

    sink_logit: float = 9.0
    heavy_logit: float = 7.0
    heavy_fraction: float = 1 / 64
    local_logit: float = 5.0
    local_window: int = 64
    local_frequencies: int = 16
    slash_logit: float = 0.0
    slash_period: int = 512
    noise: float = 0.3


def planted_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    pattern: PlantedPattern | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q ``[B, Hq, L, D]``, K and V ``[B, Hkv, L, D]`` with planted sparse attention.

    The patterns use ``4 + 2 * local_frequencies`` channels; the remaining ones carry noise. Deterministic for a given ``seed``.
    """
    pattern = pattern or PlantedPattern()
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    needed = 4 + 2 * pattern.local_frequencies
    if head_dim < needed:
        raise ValueError(f"head_dim must be >= {needed} for this pattern, got {head_dim}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    group = q_heads // kv_heads
    root = math.sqrt(math.sqrt(head_dim))  # (root * a) · (root * b) / sqrt(D) = a * b
    f32 = {"dtype": torch.float32, "device": device}
    pos = torch.arange(seq_len, **f32)

    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, **f32)
    q = torch.randn(batch, kv_heads, group, seq_len, head_dim, generator=gen, **f32)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, **f32)
    # Noise lives only in the free channels (in a planted channel the large query constant
    # would amplify it); there q·k/sqrt(D) has standard deviation about `noise`.
    k *= math.sqrt(pattern.noise)
    q *= math.sqrt(pattern.noise)
    k[..., :needed] = 0
    q[..., :needed] = 0

    # Sink (channel 0) and heavy hitters (channel 1): key flag times query constant.
    k[..., 0, 0] += root
    q[..., 0] += pattern.sink_logit * root
    heavy = torch.rand(batch, kv_heads, seq_len, generator=gen, **f32) < pattern.heavy_fraction
    k[..., 1] += heavy.float() * root
    q[..., 1] += pattern.heavy_logit * root

    # Local window (channels 2..): sum of cosines with random low frequencies peaks at i == j.
    freqs = torch.rand(pattern.local_frequencies, generator=gen, **f32)
    freqs *= math.pi / pattern.local_window
    angles = pos[:, None] * freqs[None, :]
    amp = math.sqrt(pattern.local_logit / pattern.local_frequencies)
    local = slice(2, 2 + 2 * pattern.local_frequencies)
    rotary = torch.cat([angles.cos(), angles.sin()], dim=-1)
    k[..., local] = rotary * amp * root
    q[..., local] = rotary * amp * root

    # Slash lines: one frequency, so the logit is periodic in i - j.
    if pattern.slash_logit:
        angle = 2 * math.pi * pos / pattern.slash_period
        slash = slice(2 + 2 * pattern.local_frequencies, 4 + 2 * pattern.local_frequencies)
        wave = torch.stack([angle.cos(), angle.sin()], dim=-1)
        k[..., slash] = wave * math.sqrt(pattern.slash_logit) * root
        q[..., slash] = wave * math.sqrt(pattern.slash_logit) * root

    q = q.reshape(batch, q_heads, seq_len, head_dim)
    return tuple(t.to(dtype) for t in (q, k, v))
