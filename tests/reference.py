"""Independent, deliberately naive references of the published algorithms (loops, no reuse of
library code), used to check the vectorised engine."""

from __future__ import annotations

import math

import torch


def paper_key_order(q: torch.Tensor, k: torch.Tensor, block_size: int, segment_size: int) -> torch.Tensor:
    """PBS key permutation for one head pair: q ``[L, D]``, k ``[L, D]`` -> long ``[L]``."""
    length, dim = q.shape
    importance = torch.zeros(length, dtype=torch.float64)
    for row in range(length - block_size, length):
        logits = [float(q[row].double() @ k[j].double()) / math.sqrt(dim) for j in range(row + 1)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        for j, w in enumerate(weights):
            importance[j] += w / total / block_size
    order = list(range(length))
    for start in range(0, length - segment_size + 1, segment_size):
        segment = list(range(start, start + segment_size))
        order[start : start + segment_size] = sorted(segment, key=lambda j: (-float(importance[j]), j))
    return torch.tensor(order)


def _take_until(scores: dict[int, float], forced: list[int], threshold: float) -> set[int]:
    """Forced blocks first, then by descending score, until the threshold share is reached."""
    total = sum(scores.values())
    taken, mass = set(), 0.0
    ranked = forced + sorted((j for j in scores if j not in forced), key=lambda j: -scores[j])
    for j in ranked:
        if j in forced or mass < threshold * total:
            taken.add(j)
            mass += scores.get(j, 0.0)
    return taken


def paper_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    segment_size: int,
    threshold: float,
    force_sink: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PBS-Attn (mean pooling) for one head: returns (key_order ``[L]``, bool ``[nQ, nK]``).

    ``L`` must be a multiple of ``block_size``.
    """
    length, dim = q.shape
    order = paper_key_order(q, k, block_size, segment_size)
    k_perm = k[order]
    n = length // block_size
    pooled_q = [q[i * block_size : (i + 1) * block_size].double().mean(0) for i in range(n)]
    pooled_k = [k_perm[j * block_size : (j + 1) * block_size].double().mean(0) for j in range(n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        segment = i * block_size // segment_size
        earlier = [j for j in range(n) if j * block_size // segment_size < segment]
        logits = {j: float(pooled_q[i] @ pooled_k[j]) / math.sqrt(dim) for j in earlier}
        scores = {}
        if logits:
            top = max(logits.values())
            total = sum(math.exp(x - top) for x in logits.values())
            scores = {j: math.exp(x - top) / total for j, x in logits.items()}
        last_query = (i + 1) * block_size - 1
        diagonal = [
            j
            for j in range(n)
            if j * block_size // segment_size == segment
            and min(order[j * block_size : (j + 1) * block_size].tolist()) <= last_query
        ]
        sink = [int((order == 0).nonzero()) // block_size] if force_sink else []
        forced = sink + [j for j in diagonal if j not in sink]
        for j in _take_until(scores, forced, threshold):
            mask[i, j] = True
    return order, mask


def xattention_block_mask(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, threshold: float, force_sink: bool
) -> torch.Tensor:
    """XAttention antidiagonal estimate + selection for one head, no permutation, one block per
    segment: q, k ``[L, D]`` with ``L`` a multiple of ``stride`` -> bool ``[nQ, nK]``."""
    length, dim = q.shape
    rows = length // stride
    n = -(-length // block_size)
    # Sum of S shifted products: row r, slot j, term t pairs query rS+S-1-t with key jS+t.
    antidiagonal = torch.zeros(rows, rows, dtype=torch.float64)
    for t in range(stride):
        q_t = q[stride - 1 - t :: stride].double()
        k_t = k[t::stride].double()
        antidiagonal += q_t @ k_t.T
    logits = antidiagonal / (math.sqrt(dim) * stride)
    causal = torch.ones(rows, rows, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    per_block = block_size // stride
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        scores = {
            j: float(probs[i * per_block : (i + 1) * per_block, j * per_block : (j + 1) * per_block].sum())
            for j in range(i + 1)
        }
        forced = [0, i] if force_sink and i != 0 else [i]
        for j in _take_until(scores, forced, threshold):
            mask[i, j] = True
    return mask
