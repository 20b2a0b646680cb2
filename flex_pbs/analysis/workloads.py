"""Workload families: Q/K/V whose attention has a known shape, one generator per family.

Every generator is called as ``generator(batch, q_heads, kv_heads, seq_len, head_dim, *, seed,
dtype, device)`` and returns ``q: [B, Hq, L, D]``, ``k, v: [B, Hkv, L, D]``; :data:`WORKLOADS`
maps the family names to them. The synthetic families plant their patterns in dedicated
channels (the writers of :mod:`flex_pbs.analysis.synthetic`); the logits below are after the
``1/sqrt(D)`` softmax scale, and "mass" is the exact causal softmax of a query row.

* ``a_shape`` (:func:`a_shape_qkv`): StreamingLLM's "A-shape": an attention sink (key 0) and a
  local window. Measured (float32, 4/2 heads, D=64; tests/test_workloads.py checks the L=2048
  numbers): at L=2048 every query puts >= 0.99 of its mass on key 0 and the 64 keys
  ``i-63..i`` (seeds 0-2), the sink about 0.36 of it on average; at L=8192 >= 0.95 (every
  32nd query), 0.99 on average.
* ``vertical_slash`` (:func:`vertical_slash_qkv`): MInference's vertical-slash pattern: key
  columns that every later query attends (the sink and 8 random keys) and one-token-wide
  diagonals ``i - j = o`` at fixed offsets (0, 777, 1500). Measured: at L=2048 every query puts
  >= 0.99 of its mass on the columns and diagonals (seeds 0-2), the diagonals 0.61-0.66 of it
  on average; at L=8192 >= 0.97, diagonals 0.73. The other keys' logits are not flat: they
  carry the slash kernel's floor, standard deviation 3.0 (L=2048).
* ``scattered`` (:func:`scattered_qkv`): :func:`~flex_pbs.analysis.synthetic.planted_qkv` with
  its defaults, bit for bit (earlier benchmark numbers stay comparable): sink, heavy-hitter keys
  scattered uniformly at random and shared by all queries, local window. Each key is a heavy
  hitter independently with probability 1/64, so at L=8192 a KV head has about 128 of them,
  in about 87% of its 128-token blocks and 98% of its 256-token segments (not "a tenth of the
  segments"). Measured: at L=2048 they receive 0.73-0.80 of the mass of the queries past the
  first quarter (per head, seeds 0-2), 0.85 at L=8192.
* ``captured`` (:func:`captured_qkv`): Q/K/V (after RoPE) of SmolLM2-135M reading 8192 tokens of
  Python source (``runner.data``'s ``code`` text), layers :data:`CAPTURED_LAYERS` stacked along
  the batch; saved once by :func:`capture_workload` (about 2 minutes on one CPU thread) and loaded
  from the file (a seed cannot rebuild it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flex_pbs.analysis.synthetic import (
    check_request,
    finish_qkv,
    noise_qkv,
    plant_key_flags,
    plant_offset_kernel,
    planted_qkv,
    sink_flags,
)

__all__ = [
    "CAPTURED_LAYERS",
    "DEFAULT_CAPTURED_PATH",
    "WORKLOADS",
    "AShapePattern",
    "VerticalSlashPattern",
    "a_shape_qkv",
    "capture_workload",
    "captured_qkv",
    "captured_shape",
    "load_captured",
    "scattered_qkv",
    "vertical_slash_qkv",
]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AShapePattern:
    """Strengths of the A-shape: sink and local window, in logits.

    Attributes:
        local_window: the window's width in tokens: its logit ``local_logit * sinc((i-j) / window)``
            falls to 0 at ``i - j = local_window``.
        local_frequencies: cosines that build the window (``2x`` channels); more of them lower
            the floor (``local_logit / sqrt(2 * local_frequencies)`` standard deviation) that the
            window leaves on far keys.
    """

    sink_logit: float = 12.0
    local_logit: float = 10.0
    local_window: int = 64
    local_frequencies: int = 24
    noise: float = 0.3

    def __post_init__(self) -> None:
        require_positive(self, ("local_window", "local_frequencies"))
        if self.noise < 0:
            raise ValueError(f"AShapePattern.noise must be >= 0 (a standard deviation), got {self.noise}")


@dataclass(frozen=True)
class VerticalSlashPattern:
    """Strengths and positions of the vertical-slash pattern, in logits.

    Attributes:
        vertical_count: key columns besides the sink, at random positions per batch element and
            KV head.
        slash_offsets: the diagonals ``i - j = o``; each has logit exactly ``slash_logit``.
        slash_frequencies: cosines that build the diagonals (``2x`` channels). A sum of ``F``
            cosines cannot be sharp without a floor: far from the diagonals it leaves a floor of
            standard deviation about ``slash_logit * sqrt(len(slash_offsets) / (2F))``.
    """

    sink_logit: float = 12.0
    vertical_logit: float = 12.0
    vertical_count: int = 8
    slash_logit: float = 16.0
    slash_offsets: tuple[int, ...] = (0, 777, 1500)
    slash_frequencies: int = 30
    noise: float = 0.3

    def __post_init__(self) -> None:
        require_positive(self, ("slash_frequencies",))
        offsets = self.slash_offsets
        if not offsets or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets):
            raise ValueError(f"VerticalSlashPattern.slash_offsets must be non-negative ints (i - j), got {offsets}")
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"VerticalSlashPattern.slash_offsets must be distinct, got {offsets}")
        if isinstance(self.vertical_count, bool) or not isinstance(self.vertical_count, int) or self.vertical_count < 0:
            raise ValueError(f"VerticalSlashPattern.vertical_count must be an int >= 0, got {self.vertical_count!r}")
        if self.noise < 0:
            raise ValueError(f"VerticalSlashPattern.noise must be >= 0 (a standard deviation), got {self.noise}")


# The slash frequencies are one fixed draw, the same for every seed: the floor they leave, and
# so the mass on the diagonals, varies a lot from draw to draw (at L=2048 the worst query's
# mass on columns and diagonals ranged 0.76-0.99 over five draws), and a fixed kernel is what
# a model's positional encoding is too. Seed 0 of its own generator, not the call's seed.
_SLASH_FREQUENCY_SEED = 0


def a_shape_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pattern: AShapePattern | None = None,
) -> QKV:
    """Sink plus local window: ``q: [B, Hq, L, D]``, ``k, v: [B, Hkv, L, D]``.

    Logit of query ``i`` and key ``j``: ``sink_logit`` if ``j == 0``, plus
    ``local_logit * mean_f cos(w_f (i - j))`` with one frequency ``w_f`` drawn in each of ``F``
    equal strata of ``[0, pi / local_window)`` (stratified: a lower floor than independent
    draws), plus noise of standard deviation ``noise``. Uses ``1 + 2F`` channels (49 by default).
    Nearly all mass within the sink and the window: see the module docstring.
    """
    pattern = pattern or AShapePattern()
    needed = 1 + 2 * pattern.local_frequencies
    check_request(batch, q_heads, kv_heads, seq_len, head_dim, needed, dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = noise_qkv(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim, pattern.noise, needed, gen, device)
    plant_key_flags(q, k, 0, sink_flags(batch, kv_heads, seq_len, device), pattern.sink_logit)
    freqs = stratified(pattern.local_frequencies, gen, device) * (math.pi / pattern.local_window)
    plant_offset_kernel(q, k, 1, freqs, pattern.local_logit)
    return finish_qkv(q, k, v, dtype)


def vertical_slash_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pattern: VerticalSlashPattern | None = None,
) -> QKV:
    """Vertical columns plus slash diagonals: ``q: [B, Hq, L, D]``, ``k, v: [B, Hkv, L, D]``.

    Logit of query ``i`` and key ``j``: ``sink_logit`` if ``j == 0``; ``vertical_logit`` if ``j``
    is one of ``vertical_count`` columns (distinct random keys, per batch element and KV head,
    flagged in channel 1 of K); a slash kernel of ``i - j`` equal to ``slash_logit`` on every
    diagonal ``i - j = o`` of ``slash_offsets``, with a floor elsewhere; noise. The kernel uses
    ``slash_frequencies`` cosines over ``[0, pi)`` (one per stratum, a fixed draw), so its
    diagonals are one token wide. Uses ``2 + 2F`` channels (62 by default).

    With an even antidiagonal stride the antidiagonal scorer samples only odd offsets
    ``i - j`` (docs/design.md): of the default off-centre diagonals it sees 777 and not 1500.
    """
    pattern = pattern or VerticalSlashPattern()
    needed = 2 + 2 * pattern.slash_frequencies
    check_request(batch, q_heads, kv_heads, seq_len, head_dim, needed, dtype)
    if pattern.vertical_count >= seq_len:
        raise ValueError(
            f"vertical_count ({pattern.vertical_count}) must be < seq_len ({seq_len}): the columns are "
            f"distinct keys besides key 0"
        )
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = noise_qkv(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim, pattern.noise, needed, gen, device)
    plant_key_flags(q, k, 0, sink_flags(batch, kv_heads, seq_len, device), pattern.sink_logit)
    columns = random_columns(batch, kv_heads, seq_len, pattern.vertical_count, gen, device)
    plant_key_flags(q, k, 1, columns, pattern.vertical_logit)
    fixed = torch.Generator(device=device).manual_seed(_SLASH_FREQUENCY_SEED)
    freqs = stratified(pattern.slash_frequencies, fixed, device) * math.pi
    weights = equal_height_weights(freqs, pattern.slash_offsets)
    plant_offset_kernel(q, k, 2, freqs, pattern.slash_logit, pattern.slash_offsets, weights)
    return finish_qkv(q, k, v, dtype)


def scattered_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> QKV:
    """Sink, scattered heavy hitters and local window: exactly ``planted_qkv(...)`` with its
    default :class:`~flex_pbs.analysis.synthetic.PlantedPattern` (heavy-hitter keys flagged in
    channel 1 of K). ``q: [B, Hq, L, D]``, ``k, v: [B, Hkv, L, D]``; ``head_dim >= 36``."""
    return planted_qkv(batch, q_heads, kv_heads, seq_len, head_dim, seed=seed, dtype=dtype, device=device)


# An early layer whose attention is broad and a late one whose attention is sparse: at 2048
# tokens of the same text, exact block masses at threshold 0.9 keep 0.52 / 0.38 of xattention's
# 128-token blocks in these layers (0.25-0.59 over all 30 layers).
CAPTURED_LAYERS = (5, 20)
DEFAULT_CAPTURED_PATH = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flex_pbs" / "captured_smollm2_code_8192.pt"
)


def capture_workload(
    path: str | Path = DEFAULT_CAPTURED_PATH,
    *,
    layers: Sequence[int] = CAPTURED_LAYERS,
    text: str = "code",
    seq_len: int = 8192,
) -> Path:
    """Capture SmolLM2-135M's Q/K/V on ``seq_len`` tokens of ``text`` and save them to ``path``.

    Saves a dict: ``q: [len(layers), 9, L, 64]``, ``k, v: [len(layers), 3, L, 64]`` (float32,
    after RoPE, layer ``layers[b]`` at batch index ``b``) and ``layers``, ``text``, ``seq_len``,
    ``model``. One forward pass on the CPU: about 2 minutes (one thread) at 8192 tokens. Returns
    ``path``.
    """
    from flex_pbs.integrations.capture import capture_qkv
    from flex_pbs.runner.data import token_ids
    from flex_pbs.runner.session import smollm2_session

    layers = list(layers)
    session = smollm2_session()
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < session.num_layers for i in layers):
        raise ValueError(f"layers must be a non-empty list of layer indices 0..{session.num_layers - 1}, got {layers}")
    captured = capture_qkv(session.model, token_ids(session.tokenizer, text, seq_len), layers)
    stacked = {name: torch.cat([captured[i][n] for i in layers]) for n, name in enumerate("qkv")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**stacked, "layers": layers, "text": text, "seq_len": seq_len, "model": "SmolLM2-135M-Instruct"}, path)
    return path


def load_captured(path: str | Path = DEFAULT_CAPTURED_PATH) -> dict:
    """The dict :func:`capture_workload` saved (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no captured workload at {path}; create it once (a few minutes on a CPU) with "
            f"flex_pbs.analysis.workloads.capture_workload({str(path)!r})"
        )
    return torch.load(path, map_location="cpu")


def captured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    path: str | Path = DEFAULT_CAPTURED_PATH,
) -> QKV:
    """The first ``batch`` layers, ``kv_heads`` KV heads (with their query heads) and ``seq_len``
    tokens of the captured file: ``q: [B, Hq, L, D]``, ``k, v: [B, Hkv, L, D]``.

    A prefix of the tokens is exactly what the model computes on that prefix (causal). The query
    heads per KV head and ``head_dim`` must be the file's (3 and 64 for SmolLM2). ``seed`` is
    accepted for the common signature and ignored: the data are the file's.
    """
    stored = load_captured(path)
    stored_batch, stored_q_heads, stored_len, stored_dim = stored["q"].shape
    stored_kv_heads = stored["k"].shape[1]
    group = stored_q_heads // stored_kv_heads
    check_request(batch, q_heads, kv_heads, seq_len, head_dim, 0, dtype)
    limits = {"batch": (batch, stored_batch), "kv_heads": (kv_heads, stored_kv_heads), "seq_len": (seq_len, stored_len)}
    for name, (asked, held) in limits.items():
        if asked > held:
            raise ValueError(f"{name}={asked} but {path} holds {held}")
    if head_dim != stored_dim or q_heads != kv_heads * group:
        raise ValueError(
            f"{path} holds head_dim {stored_dim} and {group} query heads per KV head: ask for "
            f"head_dim={stored_dim}, q_heads={kv_heads * group}; got head_dim={head_dim}, q_heads={q_heads}"
        )
    q = stored["q"][:batch, :q_heads, :seq_len]
    k, v = (stored[name][:batch, :kv_heads, :seq_len] for name in ("k", "v"))
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))


def captured_shape(path: str | Path = DEFAULT_CAPTURED_PATH) -> tuple[int, int, int, int, int]:
    """``(batch, q_heads, kv_heads, seq_len, head_dim)`` of the captured file: the largest
    request :func:`captured_qkv` accepts."""
    stored = load_captured(path)
    batch, q_heads, seq_len, head_dim = stored["q"].shape
    return batch, q_heads, stored["k"].shape[1], seq_len, head_dim


WORKLOADS: dict[str, Callable[..., QKV]] = {
    "a_shape": a_shape_qkv,
    "vertical_slash": vertical_slash_qkv,
    "scattered": scattered_qkv,
    "captured": captured_qkv,
}


def require_positive(pattern: object, fields: Sequence[str]) -> None:
    """Raise ``ValueError`` unless each named field of ``pattern`` is an int >= 1."""
    for field in fields:
        value = getattr(pattern, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(pattern).__name__}.{field} must be an int >= 1, got {value!r}")


def random_columns(
    batch: int, kv_heads: int, seq_len: int, count: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """bool ``[B, Hkv, L]``: ``count`` distinct random keys per batch element and KV head, never
    key 0 (the sink's)."""
    draw = torch.rand(batch, kv_heads, seq_len, generator=gen, dtype=torch.float32, device=device)
    draw[..., 0] = -1
    columns = torch.zeros(batch, kv_heads, seq_len, dtype=torch.bool, device=device)
    return columns.scatter_(-1, draw.topk(count, dim=-1).indices, True)


def stratified(count: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 ``[count]`` in ``[0, 1)``: one uniform draw in each of ``count`` equal strata."""
    jitter = torch.rand(count, generator=gen, dtype=torch.float32, device=device)
    return (torch.arange(count, dtype=torch.float32, device=device) + jitter) / count


def equal_height_weights(freqs: torch.Tensor, offsets: Sequence[int]) -> list[float]:
    """Weights of the offsets' kernels such that every diagonal ``i - j = o`` gets logit exactly
    ``logit`` from :func:`~flex_pbs.analysis.synthetic.plant_offset_kernel`.

    Unweighted, each diagonal would also get the other offsets' kernels there (0.11-0.26 of
    ``logit`` each with the defaults): its height would depend on the draw and the offsets. The weights solve
    ``G a = 1``, ``G[n, m]`` being offset ``m``'s kernel at offset ``n`` (``1`` on the diagonal).

    Args:
        freqs: float32 ``[F]``, radians per token; offsets: distinct.
    """
    offsets_t = torch.tensor(offsets, dtype=torch.float64, device=freqs.device)
    gaps = offsets_t[:, None, None] - offsets_t[None, :, None]
    kernel_at_offsets = torch.cos(freqs.double() * gaps).mean(-1)
    return torch.linalg.solve(kernel_at_offsets, torch.ones_like(offsets_t)).tolist()
