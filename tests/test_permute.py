import pytest
import torch
from reference import paper_block_mask, paper_key_order

from flex_pbs import PBSConfig, build_plan
from flex_pbs.analysis.synthetic import PlantedPattern, planted_qkv
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.permute import (
    blocks_needed,
    identity_key_order,
    key_importance,
    permute_keys,
    segment_front_key_order,
    segment_key_order,
    sorting_pays,
)


def test_key_order_matches_the_paper_reference():
    q, k = torch.randn(1, 2, 1024, 32), torch.randn(1, 2, 1024, 32)
    plan = build_plan(q, k, PBSConfig(scoring="mean", permute="key", key_sort="full", segment_size=256, force_local_blocks=0))
    for head in range(2):
        assert torch.equal(plan.key_order[0, head], paper_key_order(q[0, head], k[0, head], 128, 256))


@pytest.mark.slow  # a loop-based reference
def test_pbs_mean_block_mask_matches_the_paper_reference():
    for force_sink in (False, True):
        torch.manual_seed(1)
        q, k = torch.randn(2, 3, 1024, 32), torch.randn(2, 3, 1024, 32)
        cfg = PBSConfig(scoring="mean", permute="key", key_sort="full", segment_size=256, threshold=0.6, force_sink=force_sink,
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


def test_front_sort_moves_the_top_keys_first_and_keeps_every_other_order():
    importance = torch.tensor([[[0.1, 0.5, 0.5, 0.2, 0.9, 0.3, 0.7, 0.8, 0.6]]])
    assert segment_front_key_order(importance, 4, 2).tolist() == [[[1, 2, 0, 3, 4, 7, 5, 6, 8]]]
    ties = torch.tensor([[[0.3, 0.3, 0.3, 0.1]]])  # the last moved place goes to the earlier key
    assert segment_front_key_order(ties, 4, 2).tolist() == [[[0, 1, 2, 3]]]


def test_values_follow_keys():
    x = torch.arange(12.0).view(1, 1, 6, 2)
    order = torch.tensor([[[2, 0, 1, 5, 3, 4]]])
    assert permute_keys(x, order)[0, 0, :, 0].tolist() == [4.0, 0.0, 2.0, 10.0, 6.0, 8.0]


def _three_hitters_per_segment() -> tuple[torch.Tensor, BlockLayout, PBSConfig]:
    """1024 keys, the last query block's attention: 0.05 spread over its own (diagonal) segment,
    the rest on 9 keys, 3 in each earlier 256-key segment, each in its own 64-key block."""
    config = PBSConfig(segment_size=256, permute="auto", force_local_blocks=0, force_sink=False, threshold=0.9)
    importance = torch.zeros(1, 1, 1024)
    importance[..., 768:] = 0.05 / 256
    hitters = [segment * 256 + block * 64 + 7 for segment in range(3) for block in (0, 1, 3)]
    importance[..., hitters] = 0.95 / 9
    return importance, BlockLayout.from_config(config, 1024, 1024), config


def test_blocks_needed_counts_the_blocks_the_rule_keeps_on_exact_mass():
    importance, layout, config = _three_hitters_per_segment()
    # In order: forced 0.05, then blocks of 0.95/9 each; the k-th is kept while
    # 0.05 + (k - 1) * 0.95/9 < 0.9, so 9 blocks. Sorted: a segment's 3 hitters share its first
    # block (0.95/3 each), kept while 0.05 + (k - 1) * 0.95/3 < 0.9, so 3 blocks.
    assert blocks_needed(importance, identity_key_order(importance[..., None]), layout, config).tolist() == [[9]]
    sorted_order = segment_key_order(importance, 256)
    assert blocks_needed(importance, sorted_order, layout, config).tolist() == [[3]]
    # The forced blocks alone reaching the threshold need nothing more.
    assert blocks_needed(importance, sorted_order, layout, config.replace(threshold=0.04)).tolist() == [[0]]


def test_sorting_pays_where_it_cuts_the_needed_blocks_by_the_gain():
    importance, layout, config = _three_hitters_per_segment()
    sorted_order = segment_key_order(importance, 256)
    assert sorting_pays(importance, sorted_order, layout, config.replace(permute_gain=3.0)).tolist() == [[True]]
    assert sorting_pays(importance, sorted_order, layout, config.replace(permute_gain=3.5)).tolist() == [[False]]
    # Nothing needed without sorting: keep the order.
    assert sorting_pays(importance, sorted_order, layout, config.replace(threshold=0.04)).tolist() == [[False]]


SCATTERED = PlantedPattern()  # sink, local window and heavy hitters spread over every segment
LOCAL = PlantedPattern(heavy_fraction=0.0)  # sink and local window only
SLASH = PlantedPattern(heavy_fraction=0.0, slash_logit=4.0, slash_period=320)


@pytest.mark.parametrize("pattern, permuted", [(SCATTERED, True), (LOCAL, False), (SLASH, False)])
def test_auto_permutes_scattered_heavy_hitters_and_not_local_or_slash_inputs(pattern, permuted):
    q, k, _ = planted_qkv(1, 4, 2, 4096, 64, pattern, seed=3)
    plan = build_plan(q, k, PBSConfig(permute="auto", segment_size=256))
    assert plan.permuted_heads.tolist() == [[permuted, permuted]]


def test_auto_sorts_the_heads_it_permutes_as_key_does_and_leaves_the_others():
    scattered = planted_qkv(1, 2, 1, 4096, 64, SCATTERED, seed=4)
    local = planted_qkv(1, 2, 1, 4096, 64, LOCAL, seed=4)
    q, k = (torch.cat([a, b], dim=1) for a, b in zip(scattered[:2], local[:2]))  # KV head 0 scattered, 1 local
    auto = build_plan(q, k, PBSConfig(permute="auto", segment_size=256))
    key = build_plan(q, k, PBSConfig(permute="key", segment_size=256))
    assert auto.permuted_heads.tolist() == [[True, False]]
    assert torch.equal(auto.key_order[:, 0], key.key_order[:, 0])
    assert torch.equal(auto.key_order[:, 1], torch.arange(4096)[None])
