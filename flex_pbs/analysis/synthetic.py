"""Planted-structure Q/K/V: attention with a known sparse shape, for tests and benchmarks.

Each KV head gets four planted patterns, written into dedicated channels so that the logit of
query ``i`` and key ``j`` (after the ``1/sqrt(D)`` softmax scale) is approximately::

    sink_logit            if j == 0                       (attention sink)
  + heavy_logit           if j is a heavy-hitter key      (scattered, shared by all queries)
  + local_logit * w(i-j)                                  (local window, w(0) = 1, decays by ~window)
  + slash_logit * cos(2π (i-j) / slash_period)            (slash lines, off when slash_logit = 0)
  + small Gaussian noise

Heavy-hitter keys are drawn uniformly at random: every key is one independently with
probability ``heavy_fraction`` (1/64 by default: about 128 keys per KV head at 8K, in about 87%
of the 128-token blocks and 98% of the 256-token segments), different per batch element and KV
head. That is the scattered pattern that block-sparse attention handles worst and that PBS's
segment-local permutation gathers. Query heads of one GQA group share their KV head's pattern
with independent noise. Values are standard Gaussian.

The channel writers (:func:`noise_qkv`, :func:`plant_key_flags`, :func:`plant_offset_kernel`)
are shared with the other workload families of :mod:`flex_pbs.analysis.workloads`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def check_request(
    batch: int, q_heads: int, kv_heads: int, seq_len: int, head_dim: int, needed_channels: int, dtype: torch.dtype
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the problem with a generator's requested shape or dtype."""
    for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads), ("seq_len", seq_len),
                        ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < needed_channels:
        raise ValueError(f"head_dim must be >= {needed_channels} for this pattern, got {head_dim}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")


def channel_scale(head_dim: int) -> float:
    """``D ** 0.25``: writing ``a * s`` into a query channel and ``b * s`` into the same key
    channel adds ``a * b`` to the logit after the ``1/sqrt(D)`` softmax scale."""
    return math.sqrt(math.sqrt(head_dim))


def noise_qkv(
    batch: int, kv_heads: int, group: int, seq_len: int, head_dim: int, noise: float, planted_channels: int,
    gen: torch.Generator, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 Q ``[B, Hkv, group, L, D]``, K and V ``[B, Hkv, L, D]``: Gaussian noise in the
    channels from ``planted_channels`` on (zero below: the patterns go there), such that the
    noise part of ``q · k / sqrt(D)`` has standard deviation about ``noise``; V standard Gaussian.
    """
    f32 = {"dtype": torch.float32, "device": device}
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, **f32)
    q = torch.randn(batch, kv_heads, group, seq_len, head_dim, generator=gen, **f32)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, **f32)
    # Noise lives only in the free channels: in a planted channel the large query constant
    # would amplify it.
    k *= math.sqrt(noise)
    q *= math.sqrt(noise)
    k[..., :planted_channels] = 0
    q[..., :planted_channels] = 0
    return q, k, v


def sink_flags(batch: int, kv_heads: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """float32 ``[B, Hkv, L]``: 1 on key 0."""
    flags = torch.zeros(batch, kv_heads, seq_len, device=device)
    flags[..., 0] = 1
    return flags


def plant_key_flags(q: torch.Tensor, k: torch.Tensor, channel: int, flags: torch.Tensor, logit: float) -> None:
    """Add ``logit`` to every query's logit of the flagged keys, in place.

    Args:
        q: ``[B, Hkv, group, L, D]``; k: ``[B, Hkv, L, D]``; flags: ``[B, Hkv, L]`` (bool or 0/1).
    """
    root = channel_scale(k.shape[-1])
    k[..., channel] += flags.float() * root
    q[..., channel] += logit * root


def plant_offset_kernel(
    q: torch.Tensor, k: torch.Tensor, first_channel: int, freqs: torch.Tensor, logit: float,
    offsets: Sequence[int] = (0,), weights: Sequence[float] | None = None,
) -> None:
    """Add ``logit * weight * mean_f cos(freqs[f] * (i - j - o))`` for each offset ``o``, in place.

    The kernel of one offset peaks (at ``logit``) on the diagonal ``i - j = o`` and depends on
    ``i - j`` only: a slash line whose sharpness and floor the frequencies set. Uses the
    ``2 * len(freqs)`` channels from ``first_channel`` on.

    Args:
        q: ``[B, Hkv, group, L, D]``; k: ``[B, Hkv, L, D]``; freqs: float32 ``[F]``, radians per
            token; weights: one per offset (default 1 each).
    """
    seq_len, root = k.shape[-2], channel_scale(k.shape[-1])
    pos = torch.arange(seq_len, dtype=torch.float32, device=k.device)
    amp = math.sqrt(logit / freqs.numel())
    channels = slice(first_channel, first_channel + 2 * freqs.numel())
    k[..., channels] = rotary(pos, freqs) * amp * root
    weights = [1.0] * len(offsets) if weights is None else weights
    query = sum(weight * rotary(pos - offset, freqs) for weight, offset in zip(weights, offsets))
    q[..., channels] = query * amp * root


def rotary(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[cos(pos · freqs), sin(pos · freqs)]``: ``[L, 2F]`` for ``pos: [L]``, ``freqs: [F]``."""
    angles = pos[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def finish_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q ``[B, Hkv, group, L, D]`` as ``[B, Hq, L, D]`` (query head ``h`` in KV head
    ``h // group``), then Q, K and V cast to ``dtype``."""
    batch, kv_heads, group, seq_len, head_dim = q.shape
    q = q.reshape(batch, kv_heads * group, seq_len, head_dim)
    return tuple(t.to(dtype) for t in (q, k, v))


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
    needed = 4 + 2 * pattern.local_frequencies
    check_request(batch, q_heads, kv_heads, seq_len, head_dim, needed, dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = noise_qkv(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim, pattern.noise, needed, gen, device)

    # Sink (channel 0) and heavy hitters (channel 1): key flag times query constant.
    plant_key_flags(q, k, 0, sink_flags(batch, kv_heads, seq_len, device), pattern.sink_logit)
    heavy = torch.rand(batch, kv_heads, seq_len, generator=gen, dtype=torch.float32, device=device) < pattern.heavy_fraction
    plant_key_flags(q, k, 1, heavy, pattern.heavy_logit)

    # Local window (channels 2..): sum of cosines with random low frequencies peaks at i == j.
    freqs = torch.rand(pattern.local_frequencies, generator=gen, dtype=torch.float32, device=device)
    plant_offset_kernel(q, k, 2, freqs * (math.pi / pattern.local_window), pattern.local_logit)

    # Slash lines: one frequency, so the logit is periodic in i - j.
    if pattern.slash_logit:
        slash_freq = torch.tensor([2 * math.pi / pattern.slash_period], device=device)
        plant_offset_kernel(q, k, 2 + 2 * pattern.local_frequencies, slash_freq, pattern.slash_logit)

    return finish_qkv(q, k, v, dtype)
