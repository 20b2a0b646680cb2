import torch

from flex_pbs.engine.select import select_blocks


def scores_row(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_fewest_blocks_reaching_the_threshold():
    scores = scores_row([0.1, 0.5, 0.05, 0.3, 0.05])
    candidates = torch.ones(5, dtype=torch.bool)
    none = torch.zeros(5, dtype=torch.bool)
    assert select_blocks(scores, candidates, none, 0.8).flatten().tolist() == [False, True, False, True, False]
    assert select_blocks(scores, candidates, none, 0.81).flatten().tolist() == [True, True, False, True, False]


def test_forced_blocks_count_toward_the_threshold():
    scores = scores_row([0.1, 0.5, 0.05, 0.3, 0.05])
    forced = torch.tensor([False, False, False, True, True])
    picked = select_blocks(scores, torch.ones(5, dtype=torch.bool), forced, 0.8)
    assert picked.flatten().tolist() == [False, True, False, True, True]


def test_threshold_can_count_only_the_other_candidates_mass():
    # Forced blocks hold 0.35; the rest 0.65, of which 0.8 is 0.52: 0.5 alone falls short.
    scores = scores_row([0.1, 0.5, 0.05, 0.3, 0.05])
    forced = torch.tensor([False, False, False, True, True])
    picked = select_blocks(scores, torch.ones(5, dtype=torch.bool), forced, 0.8, counts_forced=False)
    assert picked.flatten().tolist() == [True, True, False, True, True]


def test_non_candidates_are_never_selected_and_threshold_one_keeps_all_candidates():
    scores = scores_row([0.4, 0.4, 0.2, 0.0])
    candidates = torch.tensor([True, True, False, True])
    none = torch.zeros(4, dtype=torch.bool)
    assert select_blocks(scores, candidates, none, 0.99).flatten().tolist() == [True, True, False, False]
    assert select_blocks(scores, candidates, none, 1.0).flatten().tolist() == [True, True, False, True]


def test_max_density_budget_caps_rows_but_keeps_forced_blocks():
    scores = torch.rand(2, 3, 16, 40)
    candidates = torch.ones(40, dtype=torch.bool)
    forced = torch.zeros(40, dtype=torch.bool)
    forced[:3] = True
    picked = select_blocks(scores, candidates, forced, 1.0, max_density=0.1)
    assert (picked.sum(-1) == 4).all() and picked[..., :3].all()


def test_row_chunking_is_exact(monkeypatch):
    import flex_pbs.engine.select as selection

    scores = torch.rand(1, 2, 50, 64)
    candidates = torch.rand(50, 64) < 0.7
    forced = torch.eye(50, 64, dtype=torch.bool) & candidates
    whole = select_blocks(scores, candidates, forced, 0.7)
    monkeypatch.setattr(selection, "_SELECT_CHUNK_ELEMENTS", 64 * 2 * 7)
    assert torch.equal(select_blocks(scores, candidates, forced, 0.7), whole)


def test_forced_local_blocks_precede_the_diagonal_segment():
    from flex_pbs.engine.layout import BlockLayout

    layout = BlockLayout(q_len=1024, kv_len=1024, q_offset=0, block_size=128, kv_block=128, segment_size=256)
    local = layout.preceding_blocks(2, torch.device("cpu"))
    # Query blocks 4 and 5 (segment 2, key blocks 4-5) get key blocks 2 and 3.
    assert local[4].nonzero().flatten().tolist() == [2, 3] and local[5].nonzero().flatten().tolist() == [2, 3]
    assert not local[:2].any()  # the first segment has nothing before it
    assert local[2].nonzero().flatten().tolist() == [0, 1]


def test_forced_local_blocks_are_always_computed():
    from flex_pbs import PBSConfig, build_plan

    q, k = torch.randn(1, 2, 2048, 32), torch.randn(1, 2, 2048, 32)
    plan = build_plan(q, k, PBSConfig(threshold=0.3, segment_size=256, key_block_size=None, force_local_blocks=3, permute="none"))
    blocks = plan.block_mask[0, 0]
    for row in range(4, 16):
        first_diagonal = row // 2 * 2
        assert blocks[row, first_diagonal - 3 : first_diagonal].all()
    assert plan.density < 1
