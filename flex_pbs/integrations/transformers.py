"""`attn_implementation="flex_pbs"` for every transformers model that dispatches attention
through ``AttentionInterface``.

Registration adds two entries, both through transformers' public interfaces and nothing else:

* an attention function (``AttentionInterface``) that routes each call:
  prefill from position 0 → PBS; chunked prefill (queries at the end of a longer cache) → PBS
  over the whole cache (``q_offset``); decode (one query) → exact SDPA over the cache; padded
  batches → PBS per sequence when every row's real tokens are contiguous (left or right
  padding), exact SDPA otherwise; non-causal patterns (a sliding window that the sequence
  exceeds, packed sequences, custom overlays) → exact SDPA with transformers' own mask;
  custom 4D masks (boolean, or additive float 0 / -inf) → exact SDPA with that mask;
* a mask function (``AttentionMaskInterface``) that hands layers a compact :class:`PBSMask`
  (padding and offsets, O(B·L)) instead of an L×L tensor. Without it transformers would pass
  ``attention_mask=None`` and padding would be silently lost.

Static caches (``cache_implementation="static"``, what compiled generation uses) work the same
way: the keys past the last query are the cache's empty slots and are never attended.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import (
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from flex_pbs.analysis.metrics import attention_recall
from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.pipeline import PBSPlan, config_of, pbs_attention
from flex_pbs.integrations.layer_thresholds import (
    check_layer_thresholds,
    load_layer_thresholds,
)
from flex_pbs.integrations.registry import add_attention, remove_attention
from flex_pbs.integrations.tensor_parallel import (
    check_heads,
    gather_heads,
    model_heads,
    tensor_parallel_size,
)

DEFAULT_NAME = "flex_pbs"
_BUILT_IN = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}


# ----------------------------------------------------------------------------------- the mask


@dataclass(frozen=True)
class PBSMask:
    """What each attention layer receives as ``attention_mask`` under flex_pbs.

    Attributes:
        padding: bool ``[B, q_offset + q_len]`` (True = real token) over the keys the queries
            can see, or None when none of them is padding. Keys past the last query (the empty
            slots of a static cache) are never visible.
        q_len, q_offset: queries are positions ``q_offset .. q_offset + q_len - 1``.
        kv_len: number of key/value positions the layer receives (a static cache's full length).
        causal: True when the pattern is plain causal attention (plus padding); otherwise
            the layer runs exact attention with :meth:`dense`.
    """

    padding: torch.Tensor | None
    q_len: int
    q_offset: int
    kv_len: int
    causal: bool
    mask_kwargs: dict = field(repr=False, compare=False, default_factory=dict)

    # With a compilable (static) cache, ``generate`` builds the mask itself and passes it back
    # into the model's forward, whose mask preparation tells a 2D padding mask from a prepared
    # one by ``ndim``; a PBSMask is a prepared one (see :func:`pbs_mask`).
    ndim = 4

    def dense(self) -> torch.Tensor:
        """transformers' exact boolean mask ``[B, 1, q_len, kv_len]`` for this call."""
        return sdpa_mask(**{**self.mask_kwargs, "allow_is_causal_skip": False})


def pbs_mask(**kwargs: Any) -> PBSMask:
    """Mask function registered in ``AttentionMaskInterface``: O(B·L), never L×L."""
    if isinstance(kwargs.get("attention_mask"), PBSMask):
        # generate() with a static cache made this call's mask already and hands it back in:
        # build it again from the padding it was made from (same cache state, same sizes).
        kwargs["attention_mask"] = kwargs["attention_mask"].mask_kwargs.get("attention_mask")
    kv_len = int(kwargs["kv_length"])
    kv_offset = int(kwargs.get("kv_offset", 0))
    if "q_length" in kwargs:  # transformers >= 5.2x
        q_len, q_offset = int(kwargs["q_length"]), kwargs.get("q_offset", 0)
    else:  # earlier 5.x pass the query positions
        positions = kwargs["cache_position"]
        q_len, q_offset = positions.shape[0], positions[0]
    q_offset = int(q_offset)  # a tensor with a static cache
    padding = prepare_padding_mask(kwargs.get("attention_mask"), kv_len, kv_offset)
    if padding is not None:  # absolute positions → the keys these queries can see
        padding = padding[:, kv_offset : q_offset + q_len].bool()
        if bool(padding.all()):
            padding = None
    window = kwargs.get("local_size")
    causal = kwargs.get("mask_function", causal_mask_function) is causal_mask_function or (
        window is not None and q_offset + q_len <= window
    )
    return PBSMask(padding, q_len, q_offset - kv_offset, kv_len, causal, dict(kwargs))


# ------------------------------------------------------------------------------ registration


@dataclass
class LayerStats:
    """What flex_pbs measured on one layer's last prefill (averaged over the batch)."""

    layer: int
    density: torch.Tensor  # float [Hq]
    recall: torch.Tensor | None  # float [Hq], when recall collection is on
    q_len: int
    kv_len: int
    path: str  # "pbs", "dense" (skipped layer or short input) or "exact" (fallback)
    permuted: torch.Tensor | None = None  # float [Hkv]: share of the batch whose keys were sorted

    def on_cpu(self) -> "LayerStats":
        """A copy with CPU tensors. Recorded stats stay on the attention's device until read,
        so that collecting them never makes the forward pass wait for the GPU."""
        recall = None if self.recall is None else self.recall.cpu()
        permuted = None if self.permuted is None else self.permuted.cpu()
        return dataclasses.replace(self, density=self.density.cpu(), recall=recall, permuted=permuted)


@dataclass
class PBSRegistration:
    """One registered name: the engine config plus per-layer control and stats collection."""

    name: str
    config: PBSConfig
    dense_layers: frozenset[int] = frozenset()
    layer_thresholds: Mapping[int, float] = field(default_factory=dict)
    collect_stats: bool = False
    stats_recall: bool = False
    stats: "weakref.WeakKeyDictionary[torch.nn.Module, LayerStats]" = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )
    dense_count: int | None = None  # dense_layers as given when it was an int n ("the first n")
    _fitting_layer_counts: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def check_layer_count(self, num_layers: int | None) -> None:
        """Raise ``ValueError`` if ``dense_layers`` or ``layer_thresholds`` name layers that a
        model of ``num_layers`` layers does not have (no check when the count is unknown)."""
        if num_layers is None or num_layers in self._fitting_layer_counts:
            return
        has = f"the model has {num_layers} layers (0..{num_layers - 1})" if num_layers else "the model has no layers"
        if self.dense_count is not None and self.dense_count > num_layers:
            raise ValueError(
                f"dense_layers={self.dense_count}: {has}; register(..., name={self.name!r}, "
                f"dense_layers=n) needs n <= {num_layers}"
            )
        for argument, layers in (("dense_layers", self.dense_layers), ("layer_thresholds", self.layer_thresholds)):
            beyond = sorted(layer for layer in layers if layer >= num_layers)
            if beyond:
                raise ValueError(
                    f"{argument} {beyond}: {has}; register {self.name!r} again "
                    f"(overwrite=True) with indices below {num_layers}"
                )
        self._fitting_layer_counts.add(num_layers)

    def config_for(self, layer: int | None) -> PBSConfig | None:
        """The config of one layer, or None if the layer runs dense."""
        if layer in self.dense_layers:
            return None
        if layer in self.layer_thresholds:
            return self.config.replace(threshold=self.layer_thresholds[layer])
        return self.config

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return _attention_forward(self, module, query, key, value, attention_mask, scaling, dropout, kwargs)


_REGISTRY: dict[str, PBSRegistration] = {}


def register(
    config: PBSConfig | Mapping[str, Any] | None = None,
    *,
    name: str = DEFAULT_NAME,
    dense_layers: int | Iterable[int] = 0,
    layer_thresholds: Mapping[int, float] | str | Path | None = None,
    collect_stats: bool = False,
    stats_recall: bool = False,
    overwrite: bool = False,
) -> PBSRegistration:
    """Register PBS attention under ``name`` for ``attn_implementation=name``.

    Args:
        config: a :class:`PBSConfig` or a mapping of its fields (unknown keys raise).
        dense_layers: run these layer indices dense (an int ``n`` means the first ``n``).
        layer_thresholds: per-layer threshold overrides, ``{layer_idx: threshold}``, or the
            path of a file written by ``flex-pbs-calibrate``.

            Layer indices count from 0; negative ones raise ``ValueError`` here, and indices
            (or an ``n``) beyond a model's layers raise ``ValueError`` at :func:`apply` or at
            the first forward pass of that model.
        collect_stats: record density per layer and head on every prefill
            (read with :func:`stats`); ``stats_recall`` also computes attention recall
            (exact attention probabilities: costly).
        overwrite: replace an existing registration of the same name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a transformers built-in attention; choose another name")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"attention {name!r} is already registered; pass overwrite=True to replace it "
            f"or call flex_pbs.unregister({name!r}) first"
        )
    config = config_of(config)
    dense, dense_count = _check_dense_layers(dense_layers)
    if isinstance(layer_thresholds, (str, Path)):
        thresholds = load_layer_thresholds(layer_thresholds)
    else:
        try:
            thresholds = check_layer_thresholds(layer_thresholds or {})
        except ValueError as error:
            raise ValueError(f"layer_thresholds: {error}") from None
    registration = PBSRegistration(
        name, config, dense, thresholds, collect_stats, stats_recall, dense_count=dense_count
    )
    add_attention(name, registration, pbs_mask)
    _REGISTRY[name] = registration
    return registration


def _check_dense_layers(dense_layers: int | Iterable[int]) -> tuple[frozenset[int], int | None]:
    """``(layer indices, n)`` from ``dense_layers``; ``n`` is set when an int ``n`` was given."""
    if isinstance(dense_layers, int) and not isinstance(dense_layers, bool):
        if dense_layers < 0:
            raise ValueError(
                f"dense_layers={dense_layers}: an int n means the first n layers and must be >= 0 "
                "(pass a list of indices >= 0 to pick layers)"
            )
        return frozenset(range(dense_layers)), dense_layers
    if isinstance(dense_layers, (bool, str, bytes)) or not isinstance(dense_layers, Iterable):
        raise TypeError(
            f"dense_layers={dense_layers!r}: pass an int n >= 0 (the first n layers) or a list of layer indices"
        )
    layers = list(dense_layers)
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
    if bad:
        raise ValueError(
            f"dense_layers {layers!r}: {', '.join(map(repr, bad))} "
            f"{'is not a layer index' if len(bad) == 1 else 'are not layer indices'} "
            "(ints >= 0 counted from the first layer; negative indices are not supported)"
        )
    return frozenset(layers), None


def _num_layers(config) -> int | None:
    """The number of decoder layers a transformers config declares, if it declares one."""
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) and hasattr(config, "get_text_config"):  # a composite model's config
        count = getattr(config.get_text_config(), "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def unregister(name: str = DEFAULT_NAME) -> None:
    """Remove a registration (models already switched to it stop working)."""
    if name not in _REGISTRY:
        raise KeyError(f"attention {name!r} is not registered by flex_pbs")
    del _REGISTRY[name]
    remove_attention(name)


def registration(name: str = DEFAULT_NAME) -> PBSRegistration:
    """The live registration of ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"attention {name!r} is not registered; call flex_pbs.register() first")
    return _REGISTRY[name]


def apply(model: torch.nn.Module, name: str = DEFAULT_NAME) -> torch.nn.Module:
    """Switch a loaded model to a registered PBS attention, refusing models that would ignore it.

    ``from_pretrained(..., attn_implementation="flex_pbs")`` works too, but transformers cannot
    tell that a model without ``AttentionInterface`` dispatch will silently keep its own
    attention; this does.
    """
    reg = registration(name)
    if not getattr(type(model), "_supports_attention_backend", False):
        raise TypeError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface (_supports_attention_backend is False), so flex_pbs cannot "
            "replace its attention"
        )
    reg.check_layer_count(_num_layers(getattr(model, "config", None)))
    if tensor_parallel_size(model) > 1:
        check_heads(*model_heads(model.config), tensor_parallel_size(model))
    model.set_attn_implementation(name)
    return model


def stats(model: torch.nn.Module, name: str = DEFAULT_NAME) -> dict[int, LayerStats]:
    """Per-layer stats of the last prefill, ``{layer_idx: LayerStats}``, for every query head.

    Under tensor parallelism each rank measures its own heads and this call gathers them: it is
    a collective, to be called on every rank, and every rank gets the whole model's numbers."""
    reg = registration(name)
    if not reg.collect_stats:
        raise RuntimeError(f"stats are off for {name!r}; register(..., collect_stats=True)")
    found = {s.layer: s for m in model.modules() if (s := reg.stats.get(m)) is not None}
    if not found:
        raise RuntimeError(
            f"no layer of {type(model).__name__} ran {name!r} attention: set "
            f"attn_implementation={name!r} and run a forward pass (models that do not dispatch "
            "through AttentionInterface are not supported)"
        )
    return {layer: _all_heads(found[layer], model).on_cpu() for layer in sorted(found)}


def _all_heads(layer: LayerStats, model: torch.nn.Module) -> LayerStats:
    """Under tensor parallelism a rank measured its own heads: gather every rank's."""
    if tensor_parallel_size(model) == 1:
        return layer
    recall = None if layer.recall is None else gather_heads(layer.recall, model)
    permuted = None if layer.permuted is None else gather_heads(layer.permuted, model)
    return dataclasses.replace(layer, density=gather_heads(layer.density, model), recall=recall, permuted=permuted)


def reset_stats(name: str = DEFAULT_NAME) -> None:
    registration(name).stats.clear()


# ------------------------------------------------------------------------ the attention call


def _causal(q_len: int, kv_len: int, q_offset: int, device) -> torch.Tensor:
    """Boolean ``[1, 1, q_len, kv_len]``: key visible to the query at ``q_offset + i``."""
    positions = torch.arange(q_len, device=device) + q_offset
    return (torch.arange(kv_len, device=device) <= positions[:, None])[None, None]


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    mask: torch.Tensor | None = None,
    q_offset: int | None = None,
) -> torch.Tensor:
    """Exact SDPA. ``mask``: ``[B, 1, Lq, Lk]``, boolean (True = visible) or additive float
    (0 / -inf, added to the scores as SDPA does); without one, causal attention with the
    queries at ``q_offset`` (default: the last ``Lq`` positions). Rows with no visible key
    return zeros instead of NaN."""
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if mask is None:
        if q_offset == 0 and q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        mask = _causal(q_len, kv_len, q_offset, q.device)
    if mask.dtype == torch.bool:
        empty = ~mask.any(dim=-1, keepdim=True)
        mask = mask | empty
    elif mask.is_floating_point():
        mask = mask.to(q.dtype)
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(empty, 0.0)
    else:
        raise TypeError(
            f"attention masks must be boolean (True = attend) or additive float (0 / -inf); got {mask.dtype}"
        )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


def _contiguous_spans(padding: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row, the span ``[start, end)`` of real tokens, or None if a row has holes."""
    counts = padding.sum(dim=-1)
    starts = padding.to(torch.uint8).argmax(dim=-1)
    ends = starts + counts
    positions = torch.arange(padding.shape[-1], device=padding.device)
    expected = (positions >= starts[:, None]) & (positions < ends[:, None])
    if not torch.equal(expected, padding):
        return None
    return list(zip(starts.tolist(), ends.tolist()))


# A plan together with the (batch, query rows, key span) it was computed on.
_Part = tuple[slice, slice, slice, PBSPlan]


def _pbs_per_sequence(q, k, v, mask: PBSMask, config: PBSConfig, scale) -> tuple[torch.Tensor, list[_Part]] | None:
    """PBS on each sequence's real tokens; padded query rows return zeros. None if a row has holes."""
    spans = _contiguous_spans(mask.padding)
    if spans is None:
        return None
    out = torch.zeros_like(q)
    parts = []
    for b, (start, end) in enumerate(spans):
        end = min(end, mask.q_offset + mask.q_len)
        q_start, q_end = max(0, start - mask.q_offset), end - mask.q_offset
        if q_end <= q_start:
            continue
        batch, rows, keys = slice(b, b + 1), slice(q_start, q_end), slice(start, end)
        out[batch, :, rows], plan = pbs_attention(
            q[batch, :, rows], k[batch, :, keys], v[batch, :, keys], config,
            scale=scale, q_offset=mask.q_offset + q_start - start, return_plan=True,
        )
        parts.append((batch, rows, keys, plan))
    return out, parts


def _record(reg: PBSRegistration, module, q, k, parts: list[_Part] | None, path: str, scale) -> None:
    """Store density (and recall) per head, averaged over the batch, for this layer."""
    ones = torch.ones(q.shape[1], device=q.device)
    density = torch.stack([p.head_density.mean(0).float() for *_, p in parts]).mean(0) if parts else ones
    recall = None
    if reg.stats_recall:
        recall = ones
        if parts:
            recall = torch.stack(
                [attention_recall(q[b, :, r], k[b, :, s], p, scale=scale).mean(0) for b, r, s, p in parts]
            ).mean(0)
    permuted = torch.stack([p.permuted_heads.float().mean(0) for *_, p in parts]).mean(0) if parts else None
    layer = getattr(module, "layer_idx", None)
    reg.stats[module] = LayerStats(
        -1 if layer is None else layer, density, recall, q.shape[2], k.shape[2], path, permuted
    )


def _attention_forward(reg: PBSRegistration, module, query, key, value, attention_mask, scaling, dropout, kwargs):
    if dropout and module.training:
        raise RuntimeError("flex_pbs is an inference (prefill) attention: attention dropout is not supported")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"flex_pbs supports causal attention only; {type(module).__name__} is not causal")
    reg.check_layer_count(_num_layers(getattr(module, "config", None)))
    config = reg.config_for(getattr(module, "layer_idx", None))
    q_len, kv_len = query.shape[2], key.shape[2]
    parts: list[_Part] | None = None

    if isinstance(attention_mask, torch.Tensor) or (isinstance(attention_mask, PBSMask) and not attention_mask.causal):
        # A custom 4D mask (boolean or additive float, run as SDPA runs it), or a pattern PBS
        # does not model (e.g. a sliding window it exceeds).
        dense_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else attention_mask.dense()
        out, path = exact_attention(query, key, value, scaling, dense_mask[..., : key.shape[2]]), "exact"
    else:
        mask = attention_mask or PBSMask(None, q_len, kv_len - q_len, kv_len, True)
        # Static caches hold slots past the last query: they are never visible.
        key, value = key[:, :, : mask.q_offset + q_len], value[:, :, : mask.q_offset + q_len]
        if q_len == 1 or config is None:
            visible = None if mask.padding is None else mask.padding[:, None, None, : key.shape[2]]
            if visible is not None:
                visible = visible & _causal(q_len, key.shape[2], mask.q_offset, query.device)
            out, path = exact_attention(query, key, value, scaling, visible, mask.q_offset), "dense"
        elif mask.padding is None:
            out, plan = pbs_attention(query, key, value, config, scale=scaling, q_offset=mask.q_offset, return_plan=True)
            parts, path = [(slice(None), slice(None), slice(None), plan)], "dense" if plan.dense else "pbs"
        elif (result := _pbs_per_sequence(query, key, value, mask, config, scaling)) is not None:
            (out, parts), path = result, "pbs"
        else:
            out, path = exact_attention(query, key, value, scaling, mask.dense()), "exact"
    if reg.collect_stats and q_len > 1:
        _record(reg, module, query, key, parts, path, scaling)
    return out.transpose(1, 2).contiguous(), None
