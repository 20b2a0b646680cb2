import pytest
import torch

from flex_pbs import PBSConfig, build_plan, pbs_attention
from flex_pbs.analysis.metrics import attention_recall
from flex_pbs.analysis.synthetic import PlantedPattern, planted_qkv


def test_planted_structure_is_sparse_with_high_recall():
    q, k, v = planted_qkv(1, 4, 2, 4096, 64, seed=0)
    for segment_size in (256, 512):
        cfg = PBSConfig(threshold=0.9, segment_size=segment_size, permute="key", force_local_blocks=0)
        out, plan = pbs_attention(q, k, v, cfg, return_plan=True)
        recall = attention_recall(q, k, plan)
        assert plan.density < (0.65 if segment_size == 256 else 0.5), plan.density
        assert recall.min() >= 0.9, recall
        assert torch.isfinite(out).all()


def test_permutation_gathers_scattered_heavy_hitters():
    q, k, _ = planted_qkv(1, 4, 2, 4096, 64, seed=1)
    for segment_size in (256, 512):
        for scoring in ("antidiagonal",):
            cfg = PBSConfig(segment_size=segment_size, scoring=scoring, force_local_blocks=0)
            permuted = build_plan(q, k, cfg.replace(permute="key"))
            plain = build_plan(q, k, cfg.replace(permute="none"))
            assert permuted.density < plain.density - 0.05, (segment_size, permuted.density, plain.density)
    # The heavy-hitter keys (channel 1 of the planted keys) move to the front of each segment.
    plan = build_plan(q, k, PBSConfig(segment_size=512, permute="key"))
    heavy = k[0, 0, :, 1] > 1.0
    heavy_slots = heavy[plan.key_order[0, 0]].view(-1, 512)
    first_block_share = heavy_slots[:, :128].sum() / heavy_slots.sum()
    assert first_block_share > 0.95


def test_planted_generator_is_seeded_and_validates():
    a = planted_qkv(1, 2, 1, 512, 64, seed=3)
    b = planted_qkv(1, 2, 1, 512, 64, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="head_dim must be >= 36 for this pattern, got 16"):
        planted_qkv(1, 2, 1, 512, 16, PlantedPattern(local_frequencies=16))
    with pytest.raises(ValueError, match=r"q_heads \(3\) must be a multiple of kv_heads \(2\)"):
        planted_qkv(1, 3, 2, 512, 64)


def test_planted_output_is_unchanged_by_the_shared_channel_writers():
    # Sums of planted_qkv(1, 4, 2, 512, 64, seed=0) before the writers were shared with
    # flex_pbs.analysis.workloads (commit 8770c37): earlier benchmark inputs stay the same.
    q, k, v = planted_qkv(1, 4, 2, 512, 64, seed=0)
    sums = [float(t.double().sum()) for t in (q, k, v)]
    assert sums == pytest.approx([104612.13913225054, 6074.932206764575, -194.48613679034497], rel=1e-12)


def test_planted_generator_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        planted_qkv(1, 2, 1, 512, 64, dtype=torch.int64)
