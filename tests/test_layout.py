"""BlockLayout: the geometry every stage reads, checked token by token against its definitions."""

import pytest
import torch

from flex_pbs import PBSConfig
from flex_pbs.engine.layout import PAST_ANY_QUERY, BlockLayout, block_min_position
from flex_pbs.engine.permute import segment_key_order

GEOMETRIES = [  # q_len, kv_len, block, key block, segment
    (1000, 1000, 128, 64, 128),
    (1000, 1000, 128, 128, 256),
    (700, 1500, 128, 64, 256),  # chunked prefill: queries at positions 800..1499
    (300, 1100, 64, 32, 128),
]


def layout_of(q_len, kv_len, block, key_block, segment):
    return BlockLayout(q_len=q_len, kv_len=kv_len, q_offset=kv_len - q_len, block_size=block,
                       kv_block=key_block, segment_size=segment)


def test_from_config_is_the_configs_geometry():
    layout = BlockLayout.from_config(PBSConfig(), 700, 1500, 800)
    assert (layout.block_size, layout.kv_block, layout.segment_size) == (128, 64, 512)
    assert (layout.num_q_blocks, layout.num_kv_blocks) == (6, 24)
    square = BlockLayout.from_config(PBSConfig(key_block_size=None, segment_size=256), 1000, 1000)
    assert (square.kv_block, square.segment_size, square.q_offset) == (128, 256, 0)


@pytest.mark.parametrize("changes, message", [
    ({"q_offset": 5}, r"q_offset \(5\) \+ q_len \(1000\) must equal kv_len \(1000\)"),
    ({"segment_size": 192}, r"segment_size \(192\) must be a multiple of the query block \(128\)"),
    ({"kv_block": 0}, r"kv_block must be an int >= 1, got 0"),
    ({"q_len": 1.5}, r"q_len must be an int >= 0, got 1.5"),
])
def test_bad_geometry_is_refused_with_the_field_named(changes, message):
    values = dict(q_len=1000, kv_len=1000, q_offset=0, block_size=128, kv_block=64, segment_size=128)
    with pytest.raises(ValueError, match=message):
        BlockLayout(**{**values, **changes})


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        BlockLayout(1000, 1000, 0, 128, 64, 128)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_block_relations_match_their_token_level_definitions(geometry):
    q_len, kv_len, block, key_block, segment = geometry
    layout = layout_of(*geometry)
    offset = kv_len - q_len
    q_pos = torch.arange(q_len) + offset
    q_blocks = torch.arange(q_len) // block
    k_blocks = torch.arange(kv_len) // key_block
    q_segment, k_segment = q_pos // segment, torch.arange(kv_len) // segment
    n_q, n_k = layout.num_q_blocks, layout.num_kv_blocks
    overlap = torch.zeros(n_q, n_k, dtype=torch.bool)  # a key block shares a segment with a query of the block
    earlier = torch.ones(n_q, n_k, dtype=torch.bool)  # every key of the block precedes every query's segment
    for qb in range(n_q):
        segments = set(q_segment[q_blocks == qb].tolist())
        for kb in range(n_k):
            key_segments = set(k_segment[k_blocks == kb].tolist())
            overlap[qb, kb] = bool(segments & key_segments)
            earlier[qb, kb] = max(key_segments) < min(segments)
    assert torch.equal(layout.diagonal_blocks(torch.device("cpu")), overlap)
    assert torch.equal(layout.earlier_segment_blocks(torch.device("cpu")), earlier)
    # preceding_blocks: the `count` key blocks just before the diagonal segment's first block.
    for count in (0, 1, 3):
        preceding = layout.preceding_blocks(count, torch.device("cpu"))
        for qb in range(n_q):
            first_diagonal = int(overlap[qb].nonzero()[0])
            expected = [kb for kb in range(n_k) if first_diagonal - count <= kb < first_diagonal]
            assert preceding[qb].nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_causal_blocks_hold_a_key_visible_to_the_query_block_in_any_key_order(geometry):
    q_len, kv_len, block, key_block, segment = geometry
    layout = layout_of(*geometry)
    key_order = segment_key_order(torch.rand(2, 3, kv_len), segment)
    causal = layout.causal_blocks(key_order)
    assert causal.shape == (2, 3, layout.num_q_blocks, layout.num_kv_blocks)
    last_query = torch.clamp(torch.arange(layout.num_q_blocks) * block + block, max=q_len) - 1 + (kv_len - q_len)
    padded = torch.nn.functional.pad(key_order, (0, layout.num_kv_blocks * key_block - kv_len), value=PAST_ANY_QUERY)
    slots = padded.view(2, 3, layout.num_kv_blocks, key_block)
    expected = (slots[:, :, None] <= last_query[None, None, :, None, None]).any(-1)
    assert torch.equal(causal, expected)


def test_block_min_position_per_block_and_per_stride_slot():
    order = torch.tensor([[[5, 3, 4, 0, 2, 1, 7, 6, 8, 9]]])
    assert block_min_position(order, 4).tolist() == [[[0, 1, 8]]]
    assert block_min_position(order, 4, slot_size=2).tolist() == [[[3, 0, 1, 6, 8, PAST_ANY_QUERY]]]
