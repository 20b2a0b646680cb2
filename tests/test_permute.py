import pytest
import torch
from reference import paper_block_mask, paper_key_order

from flex_pbs import PBSConfig, build_plan
from flex_pbs.engine.permute import key_importance, permute_keys, segment_key_order


def test_key_order_matches_the_paper_reference():
    q, k = torch.randn(1, 2, 1024, 32), torch.randn(1, 2, 1024, 32)
    plan = build_plan(q, k, PBSConfig(scoring="mean", permute="key", segment_size=256, force_local_blocks=0))
    for head in range(2):
        assert torch.equal(plan.key_order[0, head], paper_key_order(q[0, head], k[0, head], 128, 256))


@pytest.mark.slow  # a loop-based reference
def test_pbs_mean_block_mask_matches_the_paper_reference():
    for force_sink in (False, True):
        torch.manual_seed(1)
        q, k = torch.randn(2, 3, 1024, 32), torch.randn(2, 3, 1024, 32)
        cfg = PBSConfig(scoring="mean", permute="key", segment_size=256, threshold=0.6, force_sink=force_sink,
                        key_block_size=None, force_local_blocks=0)  # the paper: square 128-token blocks
        plan = build_plan(q, k, cfg)
        for b in range(2):
            for h in range(3):
                order, mask = paper_block_mask(q[b, h], k[b, h], 128, 256, 0.6, force_sink)
                assert torch.equal(plan.key_order[b, h], order)
                assert torch.equal(plan.block_mask[b, h], mask), (force_sink, b, h)
        assert plan.density < 1


def test_importance_averages_over_the_gqa_group():
    q, k = torch.randn(1, 4, 512, 16), torch.randn(1, 2, 512, 16)
    grouped = key_importance(q, k, 128, 0.25)
    per_head = torch.stack([key_importance(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], 128, 0.25)[0, 0] for h in range(4)])
    assert torch.allclose(grouped[0], per_head.view(2, 2, 512).mean(1), atol=1e-7)
    assert torch.allclose(grouped.sum(-1), torch.ones(1, 2), atol=1e-5)


def test_importance_chunking_over_keys_is_exact(monkeypatch):
    import flex_pbs.engine.permute as permutation

    q, k = torch.randn(1, 2, 1000, 16), torch.randn(1, 2, 1000, 16)
    whole = key_importance(q, k, 128, 0.25)
    monkeypatch.setattr(permutation, "_IMPORTANCE_KEY_CHUNK", 96)
    assert torch.allclose(key_importance(q, k, 128, 0.25), whole, atol=1e-7)


def test_segment_sort_is_descending_stable_and_leaves_the_tail():
    importance = torch.tensor([[[0.1, 0.5, 0.5, 0.2, 0.9, 0.3, 0.7]]])
    order = segment_key_order(importance, 3)
    assert order.tolist() == [[[1, 2, 0, 4, 5, 3, 6]]]


def test_values_follow_keys():
    x = torch.arange(12.0).view(1, 1, 6, 2)
    order = torch.tensor([[[2, 0, 1, 5, 3, 4]]])
    assert permute_keys(x, order)[0, 0, :, 0].tolist() == [4.0, 0.0, 2.0, 10.0, 6.0, 8.0]
