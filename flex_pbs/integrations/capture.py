"""Capture the Q/K/V a model's attention layers see (after RoPE), for offline analysis.

Implemented as one more attention function registered through transformers'
``AttentionInterface``: it records its inputs and then runs exact SDPA, so the forward pass is
unchanged. The model's attention implementation is restored afterwards.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from flex_pbs.integrations.registry import attention_registered

_CAPTURE_NAME = "flex_pbs_capture"


def capture_qkv(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: Iterable[int] | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run one forward pass and return ``{layer: (q [B, Hq, L, D], k, v [B, Hkv, L, D])}``.

    Args:
        model: a transformers causal LM that dispatches through ``AttentionInterface``.
        input_ids: ``[B, L]``.
        layers: layer indices to keep (default: all). Tensors are detached copies on CPU.
    """
    wanted = None if layers is None else set(layers)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if wanted is None or layer in wanted:
            captured[layer] = tuple(t.detach().to("cpu", copy=True) for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    previous = model.config._attn_implementation
    with attention_registered(_CAPTURE_NAME, recording_attention, sdpa_mask):
        try:
            model.set_attn_implementation(_CAPTURE_NAME)
            with torch.no_grad():
                model(input_ids)
        finally:
            model.set_attn_implementation(previous)
    if wanted is not None and wanted - set(captured):
        raise ValueError(f"layers {sorted(wanted - set(captured))} were not seen; the model has {len(captured)} attention calls")
    if not captured:
        raise RuntimeError(f"{type(model).__name__} does not dispatch attention through AttentionInterface")
    return dict(sorted(captured.items()))
