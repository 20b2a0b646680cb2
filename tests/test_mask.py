"""The BlockMask built from block tensors: exactly the selected blocks, token-causal on the
diagonal segment by original key position, padding never visible."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.mask import (
    GRADIENT_BLOCK,
    block_indices,
    build_flex_mask,
    differentiable_flex_mask,
    selection_indices,
)
from flex_pbs.engine.permute import segment_key_order


def test_block_indices_list_true_blocks_in_ascending_order():
    blocks = torch.tensor([[[[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]]], dtype=torch.bool)
    counts, indices = block_indices(blocks)
    assert counts.tolist() == [[[3, 0, 1]]] and counts.dtype == indices.dtype == torch.int32
    assert indices[0, 0, 0, :3].tolist() == [1, 3, 4] and indices[0, 0, 2, :1].tolist() == [0]


def test_selection_indices_split_diagonal_blocks_from_full_ones():
    selected = torch.tensor([[[[1, 1, 0], [1, 1, 1]]]], dtype=torch.bool)
    diagonal = torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    partial_num, partial_idx, full_num, full_idx = selection_indices(selected, diagonal)
    assert partial_num.tolist() == [[[1, 1]]] and partial_idx[0, 0, :, 0].tolist() == [1, 2]
    assert full_num.tolist() == [[[1, 2]]] and full_idx[0, 0, 1, :2].tolist() == [0, 1]


def token_mask_of(block_mask, q_len, kv_len):
    return create_mask(block_mask.mask_mod, 1, 4, q_len, kv_len, device="cpu")


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("q_len, kv_len, kernel_lengths", [(512, 512, None), (300, 700, None), (500, 500, (512, 512))])
def test_mask_computes_exactly_the_selected_blocks_causally_by_original_position(permuted, q_len, kv_len, kernel_lengths):
    layout = BlockLayout(q_len=q_len, kv_len=kv_len, q_offset=kv_len - q_len, block_size=128, kv_block=64,
                         segment_size=256)
    torch.manual_seed(0)
    key_order = segment_key_order(torch.rand(1, 2, kv_len), 256) if permuted else torch.arange(kv_len).expand(1, 2, -1)
    diagonal = layout.diagonal_blocks(torch.device("cpu"))
    selected = (torch.rand(1, 4, layout.num_q_blocks, layout.num_kv_blocks) < 0.5) | diagonal
    mask = build_flex_mask(selection_indices(selected, diagonal), key_order if permuted else None, layout, kernel_lengths)
    assert mask.BLOCK_SIZE == (128, 64) and mask.seq_lengths == (kernel_lengths or (q_len, kv_len))
    dense = mask.to_dense()  # blocks the kernel visits, partial or full
    assert torch.equal(dense[..., : layout.num_q_blocks, : layout.num_kv_blocks].bool(), selected)
    assert not dense[..., layout.num_q_blocks:, :].any()  # padding query rows compute nothing
    # Token level, on the partial (diagonal) blocks: key slot j is visible to query i exactly
    # when its original key precedes the query; past the real keys, never.
    tokens = token_mask_of(mask, *mask.seq_lengths)
    positions = torch.arange(q_len) + layout.q_offset
    group = 2
    for head in range(4):
        visible = key_order[0, head // group][None, :] <= positions[:, None]
        assert torch.equal(tokens[0, head, :q_len, :kv_len], visible)
        assert not tokens[0, head, :q_len, kv_len:].any()


def test_budgeted_lists_are_widened_on_cpu_only():
    layout = BlockLayout(q_len=1024, kv_len=1024, q_offset=0, block_size=128, kv_block=128, segment_size=128)
    diagonal = layout.diagonal_blocks(torch.device("cpu"))
    partial_num, partial_idx, full_num, full_idx = selection_indices(diagonal.expand(1, 1, 8, 8).clone(), diagonal)
    narrow = (partial_num, partial_idx[..., :3], full_num, full_idx[..., :3])  # as a budgeted selection gives them
    mask = build_flex_mask(narrow, None, layout)
    assert mask.kv_indices.shape[-1] == mask.full_kv_indices.shape[-1] == 8  # inductor's CPU kernel reads nK entries


@pytest.mark.parametrize("block_size, key_block_size, segment_size", [(128, 64, 256), (64, None, 128), (128, None, 256), (64, 32, 128), (48, None, 96)])
@pytest.mark.parametrize("permute", ["none", "key"])
@pytest.mark.parametrize("q_len", [1900, 700])
def test_differentiable_mask_attends_exactly_the_plan_on_blocks_the_backward_can_tile(block_size, key_block_size, segment_size, permute, q_len):
    """The gradient path's mask has blocks of multiples of 128 (FlexAttention's backward tiles
    must divide them: key slots for 128 x 64, merged blocks otherwise) and still computes
    exactly the plan's keys: its forward equals
    exact attention restricted to the plan (fp32, about 1e-6 apart), ragged lengths and a
    query offset included; it carries the query-block indices the backward walks."""
    from flex_pbs import PBSConfig, pbs_attention
    from flex_pbs.analysis.synthetic import planted_qkv
    from flex_pbs.engine.attend import flex_attend
    from flex_pbs.engine.permute import permute_keys
    from flex_pbs.engine.pipeline import plan_restricted_attention

    q, k, v = planted_qkv(1, 4, 2, 1900, 64, seed=3)
    q, offset = q[:, :, -q_len:], 1900 - q_len
    cfg = PBSConfig(threshold=0.8, block_size=block_size, key_block_size=key_block_size, segment_size=segment_size,
                    permute=permute, stride=16)
    with torch.no_grad():
        _, plan = pbs_attention(q, k, v, cfg, q_offset=offset, return_plan=True)
        assert plan.density < 1
        permuted = permute != "none"
        gradient_mask = differentiable_flex_mask(plan.block_mask, plan.key_order if permuted else None, plan.layout)
        mask, slots = gradient_mask.block_mask, gradient_mask.key_slots
        assert all(size % GRADIENT_BLOCK == 0 for size in mask.BLOCK_SIZE) and mask.q_indices is not None
        k_in, v_in = (t if slots is None else permute_keys(t, slots.expand(1, 2, -1)) for t in (k, v))
        out = flex_attend(q, k_in, v_in, mask, 64**-0.5)
        expected = plan_restricted_attention(q, k, v, plan, 64**-0.5)
    assert (out - expected).abs().max() < 1e-5


@pytest.mark.parametrize("permute", ["none", "key"])
def test_default_blocks_train_on_paired_key_slots_without_a_selection_lookup(permute):
    """128 x 64 blocks (the default) become 128 x 128 tiles of paired key blocks over three
    copies of the keys (both halves shown, the first only, the second only): no tile-sized
    gather of the selection, at most one tile per selected block and fewer where a row selects
    both blocks of a pair, every key once in each copy, a hidden half visible to no query, and
    full tiles only in the copy that shows both halves."""
    from flex_pbs import PBSConfig, pbs_attention
    from flex_pbs.analysis.synthetic import planted_qkv

    q, k, v = planted_qkv(1, 4, 2, 1900, 64, seed=3)
    cfg = PBSConfig(threshold=0.8, block_size=128, key_block_size=64, segment_size=256, permute=permute, stride=16)
    with torch.no_grad():
        _, plan = pbs_attention(q, k, v, cfg, return_plan=True)
    permuted = permute != "none"
    gradient_mask = differentiable_flex_mask(plan.block_mask, plan.key_order if permuted else None, plan.layout)
    mask, slots = gradient_mask.block_mask, gradient_mask.key_slots
    assert not gradient_mask.reads_selection and tuple(mask.BLOCK_SIZE) == (128, 128)
    copy_len = 15 * 128  # 30 key blocks of 64 in 15 pairs
    assert slots.shape[-1] == mask.seq_lengths[1] == 3 * copy_len
    tiles = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    assert int(plan.block_mask.sum()) / 2 <= tiles < int(plan.block_mask.sum())
    listed = torch.arange(mask.full_kv_indices.shape[-1]) < mask.full_kv_num_blocks[..., None]
    assert (mask.full_kv_indices[listed] < 15).all()  # full tiles only in the first copy
    copies = slots.expand(1, 2, -1).view(1, 2, 3, copy_len)
    assert torch.equal(copies[:, :, 0], copies[:, :, 1]) and torch.equal(copies[:, :, 0], copies[:, :, 2])
    counts = torch.stack([torch.bincount(copies[0, head, 0], minlength=1900) for head in range(2)])
    assert (counts[:, 1:] == 1).all() and (counts[:, 0] == 1 + copy_len - 1900).all()  # key 0 also fills padding
    tokens = create_mask(mask.mask_mod, 1, 4, 1900, 3 * copy_len, device="cpu")[0]
    half = torch.arange(3 * copy_len) // 64 % 2
    copy = torch.arange(3 * copy_len) // copy_len
    hidden = ((copy == 1) & (half == 1)) | ((copy == 2) & (half == 0))
    assert not tokens[..., hidden].any()
