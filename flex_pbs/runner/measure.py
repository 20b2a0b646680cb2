"""Single measurements on a loaded model: a timed forward pass, per-token losses and
perplexity, one passkey trial, a method's prefill followed by exact attention over its KV
cache, and summaries of flex_pbs's per-layer stats."""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

import flex_pbs
from flex_pbs.runner.data import passkey_prompt
from flex_pbs.runner.session import Session, attention

# Rows of logits turned into log-probabilities at once (bounds the extra memory at long lengths).
LOSS_CHUNK_ROWS = 1024


def synchronize(device: str) -> None:
    """Wait for queued work on a CUDA device (no-op on CPU), so that wall times are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_forward(session: Session, ids: torch.Tensor, **kwargs: Any) -> tuple[Any, float]:
    """One forward pass without KV cache: ``(model output, wall seconds)``."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [batch, seq_len], got shape {tuple(ids.shape)}")
    with torch.no_grad():
        synchronize(session.device)
        start = time.perf_counter()
        output = session.model(ids, use_cache=False, **kwargs)
        synchronize(session.device)
    return output, time.perf_counter() - start


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods, float32 ``[L - 1]``, of one sequence.

    Args:
        logits: ``[1, L, V]`` from a forward pass over ``ids``; ids: ``[1, L]``.
    """
    if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[1] != ids.shape[-1]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match one sequence of ids {tuple(ids.shape)}")
    predicted, targets = logits[0, :-1], ids[0, 1:]
    chunks = [
        F.cross_entropy(predicted[i : i + LOSS_CHUNK_ROWS].float(), targets[i : i + LOSS_CHUNK_ROWS], reduction="none")
        for i in range(0, targets.numel(), LOSS_CHUNK_ROWS)
    ]
    return torch.cat(chunks).cpu()


def perplexity(losses: torch.Tensor) -> float:
    """``exp`` of the mean negative log-likelihood."""
    if losses.numel() == 0:
        raise ValueError("perplexity of zero predicted tokens is undefined")
    return math.exp(float(losses.double().mean()))


def answer_found(answer: str, text: str) -> bool:
    """Whether the answer's digits appear, in order and adjacent, among the digits of ``text``."""
    return answer in "".join(ch for ch in text if ch.isdigit())


def passkey_trial(session: Session, length: int, depth: float, passkey: int, new_tokens: int) -> dict[str, Any]:
    """Hide ``passkey`` at ``depth`` of a ~``length``-token prompt, decode ``new_tokens`` greedily,
    and report whether the key's digits appear in the continuation."""
    from transformers import GenerationConfig

    tokenizer, model = session.tokenizer, session.model
    prompt, answer = passkey_prompt(tokenizer, length, depth, passkey)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(session.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=model.generation_config.eos_token_id
    )
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
    # A random-weight model can emit ids its byte-level tokenizer does not have: none is a digit.
    known = [i for i in output[0, ids.shape[1] :].tolist() if i < len(tokenizer)]
    text = tokenizer.decode(known, skip_special_tokens=True)
    return {
        "length": int(ids.shape[1]),
        "depth": depth,
        "passkey": answer,
        "output": text,
        "correct": answer_found(answer, text),
    }


def stats_summary(stats: dict[int, Any]) -> dict[str, Any]:
    """Mean density and recall over layers and heads of flex_pbs's per-layer stats, the share of
    KV heads whose keys were permuted (over the layers that ran PBS), plus the per-layer,
    per-head values and how many layers took each path."""
    if not stats:
        raise ValueError("no layer stats to summarise")
    layers = {
        layer: {
            "density": s.density.tolist(),
            "recall": None if s.recall is None else s.recall.tolist(),
            "permuted": None if s.permuted is None else s.permuted.tolist(),
            "path": s.path,
        }
        for layer, s in stats.items()
    }
    recalls = [s.recall.mean() for s in stats.values() if s.recall is not None]
    permuted = [s.permuted.mean() for s in stats.values() if s.permuted is not None]
    return {
        "density": float(torch.stack([s.density.mean() for s in stats.values()]).mean()),
        "recall": float(torch.stack(recalls).mean()) if len(recalls) == len(stats) else None,
        "permuted_heads": float(torch.stack(permuted).mean()) if permuted else 0.0,
        "paths": dict(Counter(s.path for s in stats.values())),
        "layers": layers,
    }


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of a model's KV-cache argument: ``cache`` in recent transformers, where
    ``past_key_values`` is deprecated (removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sparse_prefill_then_exact(
    session: Session,
    engine: flex_pbs.PBSConfig | None,
    prefix: torch.Tensor,
    continuation: torch.Tensor,
    dense_layers: int | tuple[int, ...] = 0,
    layer_thresholds: dict[int, float] | None = None,
    collect_stats: bool = False,
    recall: bool = False,
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Prefill with a method, then continue with exact attention, as deployed: ``prefix`` runs
    with the method's attention (``engine``; SDPA when None) keeping its KV cache, then
    ``continuation`` runs with SDPA over that cache.

    Args:
        prefix: ``[1, P]`` ids, ``P >= 1``; continuation: ``[1, C]`` ids, ``C >= 1``.
        dense_layers, layer_thresholds: as :func:`flex_pbs.register` takes them.
        collect_stats, recall: collect the prefill's density (and recall) stats (sparse only).

    Returns:
        ``(logits, stats)``: logits ``[1, C + 1, V]`` at positions ``P - 1 .. P + C - 1``, the
        prefill's last then the continuation's (row ``i < C`` predicts continuation token
        ``i``, so ``token_losses(logits, ids[:, P - 1:])`` scores the continuation); stats:
        :func:`stats_summary` of the prefill, None for dense or without ``collect_stats``.
    """
    for name, ids in (("prefix", prefix), ("continuation", continuation)):
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"{name} must be [1, n] ids with n >= 1, got shape {tuple(ids.shape)}")
    from transformers import DynamicCache

    summary = None
    cache = DynamicCache(config=session.model.config)
    kv_cache = {cache_keyword(session.model): cache}
    with torch.no_grad():
        with attention(session, engine, dense_layers, layer_thresholds, collect_stats=collect_stats, recall=recall):
            prefill = session.model(prefix, use_cache=True, logits_to_keep=1, **kv_cache)
            if engine is not None and collect_stats:
                summary = stats_summary(flex_pbs.stats(session.model))
        with attention(session, None):
            output = session.model(continuation, use_cache=True, **kv_cache)
    # Without the cache the continuation would attend to itself alone: make sure it saw the prefix.
    expected = prefix.shape[1] + continuation.shape[1]
    if output.logits.shape[1] != continuation.shape[1] or cache.get_seq_length() != expected:
        raise RuntimeError(
            f"the continuation did not extend the prefill's KV cache: {output.logits.shape[1]} logits for "
            f"{continuation.shape[1]} tokens, cache of {cache.get_seq_length()} positions, expected {expected}"
        )
    return torch.cat([prefill.logits[:, -1:], output.logits], dim=1), summary
