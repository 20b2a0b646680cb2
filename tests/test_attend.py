import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import flex_pbs.engine.attend as flex
from flex_pbs import PBSConfig, pbs_attention
from flex_pbs.engine.attend import bucket_length


def test_cpu_buckets_are_few_and_tight():
    lengths = range(300, 131073, 7)
    buckets = {bucket_length(n, 128, "cpu") for n in lengths}
    assert all(bucket_length(n, 128, "cpu") >= n for n in lengths)
    assert max(bucket_length(n, 128, "cpu") / n for n in lengths if n > 2048) < 1.125
    assert len(buckets) <= 16 + 8 * 7  # exact up to 16 blocks, then 8 per doubling to 128K
    assert bucket_length(5000, 128, "cuda") == 5000


def _frames():
    return sum(counters["frames"].values()), counters["stats"]["unique_graphs"]


def test_ten_lengths_compile_once_per_bucket_and_reuse_kernels():
    torch._dynamo.reset()
    counters.clear()
    cfg = PBSConfig(threshold=0.8)
    lengths = list(range(2100, 3100, 100))
    buckets = {bucket_length(n, cfg.block_size, "cpu") for n in lengths}
    assert len(buckets) == 4
    for n in lengths:
        q, k, v = (torch.randn(1, 2, n, 32) for _ in range(3))
        pbs_attention(q, k, v, cfg)
    assert counters["stats"]["unique_graphs"] == len(buckets)
    # A second pass over all lengths compiles nothing new (and would raise if it tried).
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in lengths:
            q, k, v = (torch.randn(1, 2, n, 32) for _ in range(3))
            assert torch.isfinite(pbs_attention(q, k, v, cfg)).all()


def test_batch_sizes_share_one_compiled_kernel():
    torch._dynamo.reset()
    counters.clear()
    cfg = PBSConfig(threshold=0.8, segment_size=128)  # sparse at 1000 keys
    for batch in (2, 3, 5, 4):
        q, k, v = torch.randn(batch, 4, 1000, 32), torch.randn(batch, 2, 1000, 32), torch.randn(batch, 2, 1000, 32)
        pbs_attention(q, k, v, cfg)
    assert counters["stats"]["unique_graphs"] == 1


def test_fifty_mixed_shapes_stay_exact_within_a_bounded_compile_budget(monkeypatch):
    """Any sequence of (B, H, L): once the process's compile budget is spent, new shapes run
    exact attention restricted to the plan (the same result), with one warning."""
    import random
    import warnings

    import torch.nn.functional as F

    import flex_pbs.engine.pipeline as pipeline

    torch._dynamo.reset()
    monkeypatch.setattr(flex, "CPU_MAX_BUCKETS", 4)
    monkeypatch.setattr(pipeline, "_warned_budget_spent", False)
    rng = random.Random(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(50):
            batch, kv_heads, group = rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([1, 2, 4])
            length = rng.choice([700, 900, 1100, 1300, 1500])
            q, k, v = (torch.randn(batch, h, length, 16) for h in (kv_heads * group, kv_heads, kv_heads))
            cfg = PBSConfig(threshold=0.7, permute=rng.choice(["none", "key"]), segment_size=256)
            out, plan = pbs_attention(q, k, v, cfg, return_plan=True)
            reference = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.token_mask(), enable_gqa=True)
            assert (out - reference).abs().max() < 1e-5
    spent = [w for w in caught if issubclass(w.category, RuntimeWarning) and "FlexAttention kernels" in str(w.message)]
    assert len(spent) == 1 and "exact attention restricted to the plan" in str(spent[0].message)
    torch._dynamo.reset()


def test_flex_attend_has_no_cpu_backward_and_says_so():
    """FlexAttention has no backward on CPU: the attend stage refuses inputs that need grad
    (the pipeline differentiates through exact plan-restricted attention instead)."""
    from flex_pbs.engine.pipeline import build_plan

    q, k, v = (torch.randn(1, 2, 640, 32) for _ in range(3))
    plan = build_plan(q, k, PBSConfig(threshold=0.9, force_local_blocks=0))
    with pytest.raises(NotImplementedError, match="inference_mode"):
        flex.flex_attend(q.requires_grad_(), k, v, plan.flex_mask, 32**-0.5)
    with torch.no_grad():
        assert torch.isfinite(flex.flex_attend(q, k, v, plan.flex_mask, 32**-0.5)).all()


def test_query_offset_is_data_not_a_kernel_constant():
    """Chunked prefill at offsets that share a length bucket reuses one compiled kernel."""
    torch._dynamo.reset()
    counters.clear()
    cfg = PBSConfig(threshold=0.8)
    for kv_len in (2100, 2150):  # both in the 2304 bucket; query offsets 1588 and 1638
        q, k, v = torch.randn(1, 2, 512, 32), torch.randn(1, 2, kv_len, 32), torch.randn(1, 2, kv_len, 32)
        pbs_attention(q, k, v, cfg, q_offset=kv_len - 512)
    assert counters["stats"]["unique_graphs"] == 1


def test_tuned_kernel_options_only_where_measured():
    from flex_pbs.engine.pipeline import build_plan

    q, k = torch.randn(1, 2, 1024, 128), torch.randn(1, 2, 1024, 128)
    plan = build_plan(q, k, PBSConfig(threshold=0.8))
    assert flex.default_kernel_options(q, plan.flex_mask) is None  # CPU: FlexAttention's defaults
    hopper, ampere = (9, 0), (8, 0)
    tuned = flex.cuda_kernel_options(128, (128, 128), (5000, 5000), hopper, keys_in_order=True)
    assert tuned == {**flex.HOPPER_D128_OPTIONS, "ROWS_GUARANTEED_SAFE": True}
    assert flex.cuda_kernel_options(64, (128, 128), (5000, 5000), hopper) is None
    assert flex.cuda_kernel_options(128, (128, 128), (5000, 5000), ampere) is None
    assert flex.cuda_kernel_options(128, (64, 64), (5000, 5000), hopper) == {"BLOCK_M": 64, "BLOCK_N": 64}
    # The default's 128 x 64 blocks: the same tuned options with 64-key tiles; elsewhere only the tiles.
    assert flex.cuda_kernel_options(128, (128, 64), (5000, 5000), hopper) == {**flex.HOPPER_D128_OPTIONS, "BLOCK_N": 64}
    assert flex.cuda_kernel_options(128, (128, 64), (5000, 5000), ampere) == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert flex.cuda_kernel_options(128, (256, 256), (5000, 5000), hopper) is None  # not measured
    # fp32: the tuned tiles need 330 KB of shared memory (Triton's report on an H100: 329 760 bytes).
    assert flex.cuda_kernel_options(128, (128, 128), (5000, 5000), hopper, itemsize=4) is None
    assert flex._shared_memory_bytes(flex.HOPPER_D128_OPTIONS, 128, 4) > 232448


def test_a_differentiated_call_tunes_the_forward_kernel_only():
    """FlexAttention applies unprefixed options to its backward kernel too; with ``backward``
    the tuned forward options become ``fwd_`` options and the backward keeps torch's configs."""
    hopper = (9, 0)
    forward = flex.cuda_kernel_options(128, (128, 128), (4096, 4096), hopper, keys_in_order=True)
    both = flex.cuda_kernel_options(128, (128, 128), (4096, 4096), hopper, keys_in_order=True, backward=True)
    assert both == {**{f"fwd_{name}": value for name, value in forward.items() if name != "IS_DIVISIBLE"},
                    "IS_DIVISIBLE": True}
    assert flex.cuda_kernel_options(128, (128, 128), (5000, 5000), (8, 0), backward=True) is None


def test_a_mask_that_gathers_gets_tiles_that_leave_room_for_the_gather():
    """Triton's report on an H100 (bf16, d=128, 128 x 128 tiles, TMA, 3 stages): 235 576 bytes
    with the gradient mask's selection lookup, more than the 232 448 there are; the estimate
    sees it and drops a stage."""
    tuned = flex.cuda_kernel_options(128, (128, 128), (4096, 4096), (9, 0), backward=True)
    gathering = flex.cuda_kernel_options(128, (128, 128), (4096, 4096), (9, 0), backward=True, mask_gathers=True)
    assert tuned["fwd_num_stages"] == 3 and gathering["fwd_num_stages"] == 2
    assert flex._shared_memory_bytes(flex.HOPPER_D128_OPTIONS, 128, 2, mask_gathers=True) > 232448 - 4096


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("block", [(128, 128), (128, 64), (64, 64), (32, 32)])
@pytest.mark.parametrize("shared_memory", [232448, 101376])  # H100, RTX 40xx / A10-class
def test_explicit_tiles_fit_shared_memory_and_divide_the_blocks(itemsize, head_dim, block, shared_memory):
    options = flex.cuda_kernel_options(head_dim, block, (4096, 4096), (9, 0), itemsize=itemsize,
                                       keys_in_order=True, shared_memory=shared_memory) or {}
    if "BLOCK_M" in options:
        assert flex._shared_memory_bytes(options, head_dim, itemsize) <= shared_memory - 4096
        assert block[0] % options["BLOCK_M"] == 0 and block[1] % options["BLOCK_N"] == 0


def test_shared_memory_that_fits_no_tile_is_a_clear_error():
    with pytest.raises(ValueError, match="use bfloat16 or float16"):
        flex.cuda_kernel_options(1024, (64, 64), (4096, 4096), (9, 0), itemsize=4, shared_memory=65536)


def _first_tile_sees_a_key(plan) -> torch.Tensor:
    """bool ``[B, Hq, Lq]``: whether the first key tile FlexAttention visits for a row (the first
    partial block of its query block, at tiles as wide as the key blocks, as the tuned Hopper
    options use) holds a key that the row may see."""
    layout, mask = plan.layout, plan.flex_mask
    first_block = mask.kv_indices[:, :, : layout.num_q_blocks, 0].long()  # [B, Hq, nQ]
    group = mask.kv_indices.shape[1] // plan.key_order.shape[1]
    order = plan.key_order.repeat_interleave(group, dim=1)
    slots = first_block[..., None] * layout.kv_block + torch.arange(layout.kv_block)
    first_key = order.gather(-1, slots.flatten(2).clamp(max=layout.kv_len - 1)).view(slots.shape).amin(-1)
    rows = torch.arange(layout.q_len) + layout.q_offset
    return first_key.repeat_interleave(layout.block_size, dim=2)[:, :, : layout.q_len] <= rows


def test_fully_masked_row_guard_is_skipped_only_where_every_first_tile_sees_a_key(monkeypatch):
    """The cause of NaN rows in permuted methods on the H100: the tuned kernel skipped
    FlexAttention's guard for rows that have seen no key yet (``ROWS_GUARANTEED_SAFE``), which
    is safe only when every row's first visited tile holds a key it may see. That holds in
    original key order; a permuted diagonal segment breaks it at segment-start rows. Every
    named method must ask for the guard exactly when it needs it."""
    import flex_pbs.engine.pipeline as attention
    from flex_pbs.analysis.synthetic import planted_qkv
    from flex_pbs.engine.methods import METHODS

    passed = {}
    real_flex_attend = attention.flex_attend

    def recording_flex_attend(*args, keys_in_order=False, **kwargs):
        passed["keys_in_order"] = keys_in_order
        return real_flex_attend(*args, keys_in_order=keys_in_order, **kwargs)

    monkeypatch.setattr(attention, "flex_attend", recording_flex_attend)
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=0)
    for name, cfg in METHODS.items():
        if cfg is None:
            continue
        _, plan = pbs_attention(q, k, v, cfg, return_plan=True)
        sees = _first_tile_sees_a_key(plan)
        options = flex.cuda_kernel_options(128, (plan.layout.block_size, plan.layout.kv_block), (2048, 2048), (9, 0),
                                           keys_in_order=passed["keys_in_order"]) or {}
        if cfg.permute == "none":
            assert passed["keys_in_order"] and sees.all(), name
        else:
            assert not passed["keys_in_order"] and not options.get("ROWS_GUARANTEED_SAFE"), name
            unsafe_rows = (~sees[0, 0]).nonzero().flatten()
            # The rows the H100 returned as NaN: the first rows of segments.
            assert len(unsafe_rows) > 0 and set((unsafe_rows % cfg.segment_size).tolist()) <= set(range(cfg.block_size)), name


@pytest.mark.parametrize("q_len, kv_len, whole", [(131072, 131072, True), (4096, 12288, True), (4096, 12300, False),
                                                   (4000, 12288, False), (64, 64, False)])
def test_whole_tiles_drop_bounds_masks(q_len, kv_len, whole):
    """IS_DIVISIBLE (no per-tile bounds masks) exactly when both lengths are multiples of 128:
    FlexAttention's tiles are then all whole, whatever the tile or the card."""
    for head_dim, block, capability in [(128, (128, 128), (9, 0)), (64, (128, 128), (8, 0)), (128, (64, 64), (9, 0))]:
        options = flex.cuda_kernel_options(head_dim, block, (q_len, kv_len), capability) or {}
        assert options.get("IS_DIVISIBLE", False) is whole


@pytest.mark.parametrize("block_size, tile", [(128, 128), (256, 128), (64, 64), (32, 32), (16, 16), (80, 16), (192, 64)])
def test_cuda_tiles_divide_the_block(block_size, tile):
    """FlexAttention's CUDA kernel needs tiles that divide the mask's blocks (its defaults are up
    to 128 rows: PBSConfig(block_size=64) failed to compile on the H100 before)."""
    assert flex.largest_tile_dividing(block_size) == tile
    assert block_size % tile == 0 and tile & (tile - 1) == 0
