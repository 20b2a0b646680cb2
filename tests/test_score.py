import torch
from reference import xattention_block_mask

from flex_pbs import PBSConfig, build_plan
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.permute import identity_key_order
from flex_pbs.engine.score import antidiagonal_block_scores, mean_pool_block_scores


def test_xattention_semantics_without_permutation():
    q, k = torch.randn(2, 4, 1024, 32), torch.randn(2, 2, 1024, 32)
    for force_sink in (True, False):
        cfg = PBSConfig(
            block_size=64, segment_size=64, stride=8, permute="none", threshold=0.8,
            force_sink=force_sink, force_local_blocks=0, peak_weight=0.0,
        )
        plan = build_plan(q, k, cfg)
        for b in range(2):
            for h in range(4):
                ref = xattention_block_mask(q[b, h], k[b, h // 2], 64, 8, 0.8, force_sink)
                assert torch.equal(plan.block_mask[b, h], ref), (force_sink, b, h)
        assert plan.density < 1


def test_antidiagonal_rows_sum_to_strided_rows_per_block():
    q, k = torch.randn(1, 2, 1000, 16), torch.randn(1, 2, 1000, 16)
    layout = BlockLayout(q_len=1000, kv_len=1000, q_offset=0, block_size=128, kv_block=128, segment_size=256)
    scores = antidiagonal_block_scores(q, k, identity_key_order(k), layout, 8, 0.25, chunk_blocks=3)
    valid_rows = torch.tensor([16] * 7 + [(1000 - 7 * 128) // 8], dtype=torch.float32)
    assert torch.allclose(scores.sum(-1), valid_rows.expand(1, 2, 8), atol=1e-4)
    # Nothing above the block diagonal without permutation.
    assert not scores[..., torch.ones(8, 8, dtype=torch.bool).triu(1)].any()


def test_antidiagonal_chunking_is_exact():
    q, k = torch.randn(1, 2, 1024, 16), torch.randn(1, 1, 1024, 16)
    layout = BlockLayout(q_len=1024, kv_len=1024, q_offset=0, block_size=128, kv_block=128, segment_size=256)
    order = identity_key_order(k)
    whole = antidiagonal_block_scores(q, k, order, layout, 8, 0.25, chunk_blocks=8)
    assert torch.allclose(antidiagonal_block_scores(q, k, order, layout, 8, 0.25, chunk_blocks=3), whole, atol=1e-6)


def test_mean_scores_cover_only_earlier_segments():
    q, k = torch.randn(1, 1, 1024, 16), torch.randn(1, 1, 1024, 16)
    layout = BlockLayout(q_len=1024, kv_len=1024, q_offset=0, block_size=128, kv_block=128, segment_size=256)
    scores = mean_pool_block_scores(q, k, layout, 0.25)
    assert scores[0, 0, :2].sum() == 0  # first segment: no earlier segment
    assert torch.allclose(scores[0, 0, 2:].sum(-1), torch.ones(6))
    assert scores[0, 0, 2, 2:].sum() == 0 and scores[0, 0, 7, 6:].sum() == 0


def test_oracle_scores_are_exact_block_masses():
    from flex_pbs.analysis.metrics import attention_recall

    q, k = torch.randn(1, 4, 1000, 16) * 2, torch.randn(1, 2, 1000, 16)
    plan = build_plan(q, k, PBSConfig(scoring="oracle", threshold=0.8, segment_size=128))
    valid_rows = torch.tensor([128.0] * 7 + [1000 - 7 * 128])
    assert torch.allclose(plan.block_scores.sum(-1), valid_rows.expand(1, 4, 8), atol=1e-3)
    # Selecting by true masses keeps at least the threshold's share of every query block.
    assert attention_recall(q, k, plan).min() >= 0.8 - 1e-4


def _strided_scores_reference(q, k, block, stride, scale, reduce):
    """Block scores from every (strided row, key slot) pair written out one by one: the logit
    is ``reduce`` over the slot's S antidiagonal products (no GEMM tricks)."""
    length = q.shape[0]
    rows = length // stride
    logits = torch.full((rows, rows), float("-inf"))
    for r in range(rows):
        for j in range(r + 1):  # stride-level causal mask: slot j starts at or before row r ends
            products = torch.stack([scale * q[r * stride + stride - 1 - t] @ k[j * stride + t] for t in range(stride)])
            logits[r, j] = reduce(products)
    probs = torch.softmax(logits, dim=-1)
    per_block = block // stride
    return probs.reshape(rows // per_block, per_block, rows // per_block, per_block).sum(dim=(1, 3))


def test_peak_estimate_is_the_softmax_of_each_antidiagonal_largest_product():
    q, k = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    layout = BlockLayout(q_len=64, kv_len=64, q_offset=0, block_size=16, kv_block=16, segment_size=16)
    order = identity_key_order(k)
    mean = _strided_scores_reference(q[0, 0], k[0, 0], 16, 4, 0.5, torch.mean)
    peak = _strided_scores_reference(q[0, 0], k[0, 0], 16, 4, 0.5, torch.max)
    for weight in (0.0, 0.3, 1.0):
        scores = antidiagonal_block_scores(q, k, order, layout, 4, 0.5, chunk_blocks=3, peak_weight=weight)
        assert torch.allclose(scores[0, 0], (1 - weight) * mean + weight * peak, atol=1e-5), weight
    assert not torch.allclose(mean, peak, atol=1e-2)


def test_peak_estimate_keeps_one_strong_pair_that_the_mean_dilutes():
    # One query (position 403) matches one far key (position 44) strongly; everything else is
    # noise. 403 % 8 + 44 % 8 = 7: the pair lies on a sampled antidiagonal of stride 8.
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 512, 16) * 0.3, torch.randn(1, 1, 512, 16) * 0.3
    direction = torch.randn(16)
    q[0, 0, 403], k[0, 0, 44] = direction * 1.5, direction * 1.5
    layout = BlockLayout(q_len=512, kv_len=512, q_offset=0, block_size=64, kv_block=64, segment_size=64)
    order = identity_key_order(k)
    excess = {}  # the far block's score above the other full blocks of the query block's row
    for weight in (0.0, 1.0):
        row = antidiagonal_block_scores(q, k, order, layout, 8, 0.25, peak_weight=weight)[0, 0, 403 // 64]
        excess[weight] = float(row[44 // 64] - row[1:6].mean())
    # The peak softmax gives the matching strided row's mass (a row sums to 1) to that block;
    # the mean estimate, whose logit is an eighth of the pair's, barely moves it.
    assert excess[1.0] > 0.8 and excess[0.0] < 0.2, excess


def test_scores_with_narrower_key_blocks_sum_finer_tiles():
    q, k = torch.randn(1, 2, 1000, 16), torch.randn(1, 1, 1000, 16)
    order = identity_key_order(k)
    wide = BlockLayout(q_len=1000, kv_len=1000, q_offset=0, block_size=128, kv_block=128, segment_size=128)
    narrow = BlockLayout(q_len=1000, kv_len=1000, q_offset=0, block_size=128, kv_block=64, segment_size=128)
    for weight in (0.0, 0.5):
        scores = antidiagonal_block_scores(q, k, order, narrow, 8, 0.25, peak_weight=weight)
        assert scores.shape == (1, 2, 8, 16)
        # Pairs of 64-key blocks add up to the 128-block scores (the same softmax per row).
        whole = antidiagonal_block_scores(q, k, order, wide, 8, 0.25, peak_weight=weight)
        assert torch.allclose(scores.unflatten(-1, (8, 2)).sum(-1), whole, atol=1e-5)
    exact = build_plan(q * 2, k, PBSConfig(scoring="oracle", key_block_size=64, threshold=0.8, segment_size=128)).block_scores
    assert exact.shape == (1, 2, 8, 16)
    assert torch.allclose(exact.sum(-1), torch.tensor([128.0] * 7 + [1000 - 7 * 128]).expand(1, 2, 8), atol=1e-3)


def test_one_scorer_per_configurable_scoring():
    from flex_pbs.engine.config import SCORINGS
    from flex_pbs.engine.score import SCORERS

    assert sorted(SCORERS) == sorted(SCORINGS)
