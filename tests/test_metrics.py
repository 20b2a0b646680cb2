import math

import torch

from flex_pbs import PBSConfig, build_plan
from flex_pbs.analysis.metrics import attention_recall, sample_query_blocks


def brute_force_recall(q, k, plan):
    """Token-level mask from the plan, exact softmax, mass inside it; loops for clarity."""
    batch, q_heads, length, dim = q.shape
    group = q_heads // k.shape[1]
    q_block, kv_block = plan.layout.block_size, plan.layout.kv_block
    out = torch.zeros(batch, q_heads)
    for b in range(batch):
        for h in range(q_heads):
            slot_of = torch.argsort(plan.key_order[b, h // group])
            probs = torch.softmax(
                (q[b, h] @ k[b, h // group].T / math.sqrt(dim)).masked_fill(
                    torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")
                ),
                dim=-1,
            )
            computed = plan.block_mask[b, h][torch.arange(length)[:, None] // q_block, slot_of[None, :] // kv_block]
            out[b, h] = (probs * computed).sum(-1).mean()
    return out


def test_recall_matches_brute_force_and_is_one_when_dense():
    q, k = torch.randn(2, 4, 1000, 16) * 2, torch.randn(2, 2, 1000, 16)
    plan = build_plan(q, k, PBSConfig(threshold=0.7))
    assert torch.allclose(attention_recall(q, k, plan), brute_force_recall(q, k, plan), atol=1e-5)
    dense = build_plan(q, k, PBSConfig(threshold=1.0))
    assert torch.allclose(attention_recall(q, k, dense), torch.ones(2, 4), atol=1e-5)


def test_recall_on_a_subsample_of_query_blocks():
    q, k = torch.randn(1, 2, 1024, 16) * 2, torch.randn(1, 2, 1024, 16)
    plan = build_plan(q, k, PBSConfig(threshold=0.7))
    blocks = sample_query_blocks(plan.layout.num_q_blocks, 3, seed=0)
    assert blocks[-1] == 7 and len(blocks) == 3
    sub = attention_recall(q, k, plan, query_blocks=blocks)
    assert sub.shape == (1, 2) and (sub > 0).all() and (sub <= 1 + 1e-6).all()
