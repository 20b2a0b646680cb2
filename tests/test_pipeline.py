import pytest
import torch
import torch.nn.functional as F
from conftest import random_qkv, rel_error

from flex_pbs import PBSConfig, build_plan, pbs_attention
from flex_pbs.analysis.synthetic import PlantedPattern, planted_qkv
from flex_pbs.engine.methods import METHODS
from flex_pbs.engine.pipeline import dense_causal_attention


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("length", [1000, 1024])
@pytest.mark.parametrize("scoring", ["antidiagonal", "mean"])
@pytest.mark.parametrize("permute", ["key", "none"])
def test_threshold_one_equals_dense_sdpa(length, scoring, permute):
    q, k, v = random_qkv(2, 8, 2, length, 64)
    cfg = PBSConfig(threshold=1.0, scoring=scoring, permute=permute, segment_size=256)
    out, plan = pbs_attention(q, k, v, cfg, return_plan=True)
    assert not plan.dense and plan.density == 1.0
    assert rel_error(out, sdpa(q, k, v)) < 1e-5


@pytest.mark.parametrize("length", [2048, 2000])
@pytest.mark.parametrize("method", [name for name, cfg in METHODS.items() if cfg is not None])
def test_output_equals_exact_attention_restricted_to_the_plan(method, length):
    """What the kernel computes is what the plan says, permuted or not: exact attention over the
    keys of the computed blocks. fp32 on both sides: 1e-5 leaves room for the different
    summation orders of a 2K-key softmax (about 100 float32 ulps), not for a wrong key."""
    q, k, v = planted_qkv(1, 4, 2, length, 64, seed=1)
    out, plan = pbs_attention(q, k, v, METHODS[method], return_plan=True)
    assert not plan.dense and plan.density < 1.0
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.token_mask(), enable_gqa=True)
    assert rel_error(out, reference) < 1e-5
    # The plan really drops keys: the restricted reference is not dense attention.
    assert rel_error(reference, sdpa(q, k, v)) > 1e-3


def test_output_equals_exact_attention_restricted_to_the_plan_with_permuted_and_unpermuted_heads():
    """``permute="auto"`` mixes sorted and original key orders across the heads of one call;
    fp32 both sides, tolerance as above."""
    scattered = planted_qkv(1, 2, 1, 2048, 64, seed=5)
    local = planted_qkv(1, 2, 1, 2048, 64, PlantedPattern(heavy_fraction=0.0), seed=5)
    q, k, v = (torch.cat(pair, dim=1) for pair in zip(scattered, local))
    out, plan = pbs_attention(q, k, v, PBSConfig(permute="auto", segment_size=256), return_plan=True)
    assert plan.permuted_heads.tolist() == [[True, False]] and plan.density < 1.0
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.token_mask(), enable_gqa=True)
    assert rel_error(out, reference) < 1e-5


@pytest.mark.parametrize("permute", ["key", "none", "auto"])
def test_token_mask_is_causal_in_caller_order_and_follows_the_blocks(permute):
    q, k, _ = planted_qkv(1, 4, 2, 1500, 64, seed=2)
    offset = 300
    plan = build_plan(q[:, :, offset:], k, PBSConfig(threshold=0.7, permute=permute, segment_size=256,
                                                     force_local_blocks=0), q_offset=offset)
    mask = plan.token_mask()
    assert mask.shape == (1, 4, 1200, 1500) and mask.dtype == torch.bool
    causal = torch.arange(1500)[None, :] <= torch.arange(offset, 1500)[:, None]
    assert not (mask & ~causal).any()
    assert mask[..., torch.arange(1200), torch.arange(offset, 1500)].all()  # own key: diagonal segment
    # Token by token, a key is attended iff its slot's block is computed (and it is causal).
    layout, order = plan.layout, plan.key_order[0, 0]
    for row in (0, 333, 1199):
        blocks = plan.block_mask[0, 1, row // layout.block_size]
        expected = torch.zeros(1500, dtype=torch.bool)
        expected[order] = blocks.repeat_interleave(layout.kv_block)[:1500]
        assert torch.equal(mask[0, 1, row], expected & causal[row])


def test_permutation_really_moves_keys_and_output_stays_in_query_order():
    q, k, v = random_qkv(1, 4, 4, 1024, 32)
    out, plan = pbs_attention(q, k, v, PBSConfig(threshold=1.0, permute="key", segment_size=256), return_plan=True)
    assert not torch.equal(plan.key_order[0, 0], torch.arange(1024))
    assert rel_error(out, sdpa(q, k, v)) < 1e-5


# Half-precision tolerances: bf16 keeps 8 mantissa bits (~4e-3 relative per rounding), fp16
# keeps 11 (~5e-4); an attention output accumulates a few roundings of each.
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_threshold_one_matches_fp32_reference(dtype, tol):
    q, k, v = random_qkv(1, 4, 2, 1024, 64, dtype=dtype)
    out = pbs_attention(q, k, v, PBSConfig(threshold=1.0))
    assert out.dtype == dtype
    assert rel_error(out, sdpa(q.float(), k.float(), v.float())) < tol


def test_sparse_output_in_fp16_is_close_to_the_plan_restricted_fp32_reference():
    q, k, v = random_qkv(1, 4, 2, 2048, 64, dtype=torch.float16)
    out, plan = pbs_attention(q, k, v, PBSConfig(threshold=0.5), return_plan=True)
    assert plan.density < 1 and out.dtype == torch.float16
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=plan.token_mask(),
                                               enable_gqa=True)
    assert rel_error(out, reference) < 3e-3  # fp16's tolerance above (11-bit mantissa)


def test_chunked_prefill_queries_at_the_end_of_the_keys():
    q, k, v = random_qkv(1, 4, 2, 1536, 64, q_len=640)
    offset = 1536 - 640
    out, plan = pbs_attention(q, k, v, PBSConfig(threshold=1.0), q_offset=offset, return_plan=True)
    assert plan.density == 1.0 and plan.block_mask.shape[-2:] == (5, 24)  # 128 queries x 64 keys
    assert rel_error(out, dense_causal_attention(q, k, v, 64**-0.5, offset)) < 1e-5
    # The chunk's rows equal the same rows of a one-shot prefill at the same sparsity.
    q_full = torch.cat([torch.randn(1, 4, offset, 64), q], dim=2)
    cfg = PBSConfig(threshold=0.8, permute="none", force_sink=True)
    chunk = pbs_attention(q, k, v, cfg, q_offset=offset)
    assert torch.isfinite(chunk).all()
    one_shot = pbs_attention(q_full, k, v, cfg.replace(threshold=1.0))
    assert rel_error(pbs_attention(q, k, v, cfg.replace(threshold=1.0), q_offset=offset), one_shot[:, :, offset:]) < 1e-5


@pytest.mark.parametrize("scoring", ["antidiagonal", "mean"])
def test_block_aligned_chunk_equals_the_same_rows_of_a_one_shot_prefill(scoring):
    """Same last query block (same key order) and aligned query blocks: same plan rows."""
    q, k, v = random_qkv(1, 4, 2, 1536, 64)
    cfg = PBSConfig(threshold=0.7, scoring=scoring, permute="key", segment_size=256)
    one_shot, full_plan = pbs_attention(q, k, v, cfg, return_plan=True)
    chunk, plan = pbs_attention(q[:, :, 768:], k, v, cfg, q_offset=768, return_plan=True)
    assert full_plan.density < 1
    assert torch.equal(plan.key_order, full_plan.key_order)
    assert torch.equal(plan.block_mask, full_plan.block_mask[:, :, 6:])
    assert rel_error(chunk, one_shot[:, :, 768:]) < 1e-5


def test_short_inputs_fall_back_to_dense():
    q, k, v = random_qkv(1, 4, 2, 256, 64)
    out, plan = pbs_attention(q, k, v, PBSConfig(threshold=0.5), return_plan=True)
    assert plan.dense and plan.flex_mask is None and plan.density == 1.0
    assert rel_error(out, sdpa(q, k, v)) < 1e-6
    q, k, v = random_qkv(1, 4, 2, 700, 64)
    _, plan = pbs_attention(q, k, v, PBSConfig(threshold=0.5, dense_below=1024), return_plan=True)
    assert plan.dense


@pytest.mark.parametrize("permute, segment", [("none", 128), ("key", 256)])
def test_narrower_key_blocks_keep_attention_exact_and_select_per_key_block(permute, segment):
    q, k, v = random_qkv(2, 8, 2, 1000, 64)
    cfg = PBSConfig(key_block_size=64, permute=permute, segment_size=segment, force_local_blocks=8)
    out, plan = pbs_attention(q, k, v, cfg.replace(threshold=1.0), return_plan=True)
    assert rel_error(out, sdpa(q, k, v)) < 1e-5 and plan.flex_mask.BLOCK_SIZE == (128, 64)
    # Chunked prefill: queries at the end of the keys.
    chunk = pbs_attention(q[:, :, 600:], k, v, cfg.replace(threshold=1.0), q_offset=600)
    assert rel_error(chunk, sdpa(q, k, v)[:, :, 600:]) < 1e-5
    plan = build_plan(q, k, cfg.replace(threshold=0.5))
    assert plan.block_mask.shape == (2, 8, 8, 16) and plan.causal_blocks.shape == (2, 2, 8, 16)
    # Forced per row: the key blocks of the diagonal segment and the 8 key blocks (512 tokens)
    # before it; query block 7 (positions 896..999) of an unpermuted layout: key blocks 6..15.
    if permute == "none":
        assert plan.block_mask[..., 7, 6:].all() and plan.block_mask[..., 6, 4:14].all()
    assert 0 < plan.density < 1


def test_plan_shapes_and_types():
    q, k, _ = random_qkv(2, 6, 3, 1100, 32)
    plan = build_plan(q, k, PBSConfig(threshold=0.9, permute="key", segment_size=256))
    assert plan.block_mask.shape == (2, 6, 9, 18) and plan.block_mask.dtype == torch.bool  # 128 x 64 blocks
    assert plan.key_order.shape == (2, 3, 1100) and plan.key_order.dtype == torch.long
    assert plan.block_scores.shape == (2, 6, 9, 18)
    assert plan.head_density.shape == (2, 6)
    assert 0 < plan.density <= 1
    # Computed blocks are causal, and every row computes its diagonal segment.
    causal = plan.causal_blocks.repeat_interleave(2, dim=1)
    assert not (plan.block_mask & ~causal).any()
    diagonal_causal = plan.layout.diagonal_blocks(q.device) & causal
    assert (plan.block_mask | ~diagonal_causal).all()
    # key_order is a permutation that keeps keys inside their segment.
    sorted_order = plan.key_order.sort(dim=-1).values
    assert torch.equal(sorted_order, torch.arange(1100).expand_as(sorted_order))
    slots = torch.arange(1100)
    assert torch.equal(plan.key_order // 256, (slots // 256).expand_as(plan.key_order))
    # The incomplete tail segment (1024..1099) keeps its order.
    assert torch.equal(plan.key_order[..., 1024:], slots[1024:].expand(2, 3, -1))


def test_scale_keyword_like_sdpa():
    q, k, v = random_qkv(1, 2, 2, 1024, 64)
    out = pbs_attention(q, k, v, PBSConfig(threshold=1.0), scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert rel_error(out, ref) < 1e-5


def test_inputs_are_not_modified():
    q, k, v = random_qkv(1, 4, 2, 1024, 64)
    copies = [t.clone() for t in (q, k, v)]
    pbs_attention(q, k, v, PBSConfig(threshold=0.7))
    build_plan(q, k, PBSConfig(threshold=0.7, scoring="mean"))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


def _bad(**changes):
    q, k, v = random_qkv(1, 4, 2, 512, 32)
    args = {"q": q, "k": k, "v": v, **changes}
    return args


@pytest.mark.parametrize(
    "args, error, words",
    [
        (_bad(q=torch.randn(4, 512, 32)), ValueError, "q must have rank 4"),
        (_bad(k=torch.randn(2, 2, 512, 32)), ValueError, "batch size"),
        (_bad(v=torch.randn(1, 2, 500, 32)), ValueError, "same heads and length"),
        (_bad(k=torch.randn(1, 2, 500, 32), v=torch.randn(1, 2, 500, 32)), ValueError, "q_offset"),
        (_bad(k=torch.randn(1, 2, 512, 16), v=torch.randn(1, 2, 512, 16)), ValueError, "head dim"),
        (_bad(k=torch.randn(1, 3, 512, 32), v=torch.randn(1, 3, 512, 32)), ValueError, "multiple of key/value heads"),
        (_bad(k=torch.randn(1, 2, 512, 32, dtype=torch.float16)), TypeError, "share a dtype"),
        (_bad(q=torch.randn(1, 4, 512, 32).double()), TypeError,
         r"q is torch.float64; flex_pbs computes in float32, bfloat16 or float16"),
        (_bad(k=torch.randn(1, 0, 512, 32), v=torch.randn(1, 0, 512, 32)), ValueError, "k must have at least one head"),
        (_bad(scale=float("nan")), ValueError, "scale must be a positive finite float or None, got nan"),
        (_bad(scale=float("inf")), ValueError, "scale must be a positive finite float or None, got inf"),
        (_bad(config=[0.5]), TypeError, "config must be a PBSConfig, a mapping of its fields or None, got list"),
        (_bad(config={"treshold": 0.5}), TypeError, r"unknown PBSConfig key\(s\) \['treshold'\]"),
        (_bad(config=PBSConfig(backend="triton", segment_size=128, force_local_blocks=0)), ValueError,
         r"backend='triton'\) needs a CUDA device \(inputs are on cpu\)"),
        (_bad(q=torch.ones(1, 4, 512, 32, dtype=torch.long)), TypeError, "floating point"),
        (_bad(v="values"), TypeError, "v must be a torch.Tensor"),
        (_bad(k=torch.randn(1, 2, 512, 32, device="meta"), v=torch.randn(1, 2, 512, 32, device="meta")), ValueError, "one device"),
        (_bad(scale=-1.0), ValueError, "scale"),
        (_bad(q_offset=-3), TypeError, "q_offset"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(args, error, words):
    with pytest.raises(error, match=words):
        pbs_attention(**args)


def test_config_may_be_a_mapping_of_its_fields():
    q, k, v = random_qkv(1, 4, 2, 1024, 32)
    out, plan = pbs_attention(q, k, v, {"threshold": 0.5, "force_local_blocks": 0}, return_plan=True)
    assert torch.equal(out, pbs_attention(q, k, v, PBSConfig(threshold=0.5, force_local_blocks=0)))
    assert plan.density < 1


@pytest.mark.parametrize("shape, q_len", [((0, 4, 2, 1024, 32), None), ((1, 4, 2, 1024, 0), None),
                                          ((1, 4, 2, 1024, 32), 0), ((1, 4, 2, 0, 32), None)])
def test_empty_inputs_give_empty_outputs_like_sdpa(shape, q_len):
    batch, q_heads, kv_heads, length, dim = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, length, dim)
    q = q[:, :, : length if q_len is None else q_len]
    offset = length - q.shape[2]
    out, plan = pbs_attention(q, k, v, q_offset=offset, return_plan=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(q.shape[2], length, dtype=torch.bool),
                                              enable_gqa=True)
    assert out.shape == expected.shape == (batch, q_heads, q.shape[2], dim)
    assert plan.density == 1.0 and plan.head_density.shape == (batch, q_heads)
    assert build_plan(q, k, q_offset=offset).density == 1.0


def test_a_non_finite_query_row_is_nan_as_in_sdpa_never_zeros():
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=3)
    q[0, 1, 1500] = float("nan")
    q[0, 2, 700, 5] = float("inf")
    out = pbs_attention(q, k, v)
    reference = sdpa(q, k, v)
    assert torch.isnan(out[0, 1, 1500]).all() and torch.isnan(out[0, 2, 700]).all()
    assert torch.isnan(reference[0, 1, 1500]).all() and torch.isnan(reference[0, 2, 700]).all()
    finite_rows = torch.isfinite(out).all(-1)
    assert finite_rows.sum() == finite_rows.numel() - 2


def test_non_finite_entries_are_found_in_every_chunk_of_rows(monkeypatch):
    """The finiteness check reads Q, K and V a chunk of rows at a time (isfinite's temporaries
    are 2.5x a 16-bit input): entries on the first and last row of a chunk still make NaN rows."""
    import flex_pbs.engine.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_CHUNK_ELEMENTS", 4 * 64 * 5)  # 5 query rows, 10 key rows
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=3)
    q[0, 1, 1500] = float("nan")  # first row of a chunk
    q[0, 2, 704, 63] = float("-inf")  # last row of a chunk
    v[0, 1, 1999, 0] = float("inf")  # last row of a key chunk: query heads 2 and 3 attend it (diagonal)
    out = pbs_attention(q, k, v)
    nan_rows = torch.isnan(out).any(-1)[0]
    assert nan_rows[1, 1500] and nan_rows[2, 704] and nan_rows[2:, 1999:].all()
    assert nan_rows[:2].sum() == 1 and nan_rows[2:, :1920].sum() == 1  # a value's NaN stays in its tile's rows


@pytest.mark.parametrize("cfg, offset", [(PBSConfig(), 0), (PBSConfig(), 1000),
                                         (PBSConfig(permute="key", segment_size=256), 0),
                                         (PBSConfig(permute="key", segment_size=256), 300)])
@pytest.mark.parametrize("bad", ["k", "v"])
def test_a_nan_key_or_value_reaches_exactly_the_rows_whose_plan_holds_it(cfg, offset, bad):
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=3)
    (k if bad == "k" else v)[0, 0, [900, 1500]] = float("nan")  # one in a diagonal block, one far
    out, plan = pbs_attention(q[:, :, offset:], k, v, cfg, q_offset=offset, return_plan=True)
    sees_it = plan.token_mask()[0, :2][..., [900, 1500]].any(-1)  # query heads 0 and 1 share KV head 0
    assert sees_it.any()
    nan_rows = torch.isnan(out[0, :2]).any(-1)
    assert (nan_rows >= sees_it).all() and torch.isfinite(out[0, 2:]).all()  # a NaN in is a NaN out
    if bad == "k":  # exactly those rows (a NaN value also reaches rows of its tile that mask it: 0 * NaN)
        assert nan_rows.equal(sees_it)


def test_float16_scores_do_not_overflow():
    """Raw q·k sums past float16's 65504 (logits stay moderate after the 1/sqrt(D) scale):
    every scorer and the importance compute in float32, so the fp16 plan is the fp32 plan of
    the same values, not a plan of infinities."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 4, 2048, 64) * 40).half(), (torch.randn(1, 2, 2048, 64) * 40).half()
    assert (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)).abs().max() > 65504
    for cfg in (PBSConfig(), PBSConfig(scoring="mean"), PBSConfig(permute="key", segment_size=256)):
        half, single = build_plan(q, k, cfg), build_plan(q.float(), k.float(), cfg)
        assert torch.isfinite(half.block_scores).all(), cfg
        assert (half.block_mask != single.block_mask).float().mean() < 1e-3, cfg
        assert abs(half.density - single.density) < 1e-3, cfg


@pytest.mark.parametrize("permute", ["none", "key"])
def test_values_after_a_row_never_reach_it(permute):
    """Causality of values. (With permute="key" a later *key* may change which earlier blocks
    a row computes, because the key order comes from the last query block: the paper's design.)"""
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=4)
    cfg = PBSConfig(permute=permute, segment_size=256)
    out = pbs_attention(q, k, v, cfg)
    for row in (700, 1300):
        changed = v.clone()
        changed[:, :, row + 1 :] = torch.randn_like(changed[:, :, row + 1 :])
        assert torch.equal(pbs_attention(q, k, changed, cfg)[:, :, : row + 1], out[:, :, : row + 1])


@pytest.mark.parametrize("permute, q_len", [("none", None), ("key", None), ("key", 700)])
def test_gradients_equal_exact_attention_restricted_to_the_plan(permute, q_len):
    """Differentiable on CPU: the plan is made without grad, then the gradients with respect
    to q, k and v are those of exact attention over the plan's keys (float64 reference; fp32
    leaves about 1e-6 relative)."""
    q, k, v = planted_qkv(1, 4, 2, 1500, 64, seed=5)
    q = q[:, :, -(q_len or 1500):]
    offset = 1500 - q.shape[2]
    cfg = PBSConfig(threshold=0.8, permute=permute, segment_size=256)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, plan = pbs_attention(*inputs, cfg, q_offset=offset, return_plan=True)
    assert plan.density < 1 and out.requires_grad
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    reference = [t.clone().double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*reference, attn_mask=plan.token_mask(), enable_gqa=True)
    (expected * weights.double()).sum().backward()
    assert rel_error(out, expected) < 1e-5
    for got, want in zip(inputs, reference):
        assert rel_error(got.grad, want.grad) < 1e-5
    with torch.no_grad():  # the forward value is the one inference gives
        assert rel_error(pbs_attention(q, k, v, cfg, q_offset=offset), out) < 1e-5


def test_gradients_at_threshold_one_equal_sdpa_and_long_inputs_are_refused_on_cpu(monkeypatch):
    import flex_pbs.engine.pipeline as pipeline

    q, k, v = (t.clone().requires_grad_() for t in random_qkv(1, 4, 2, 1024, 32))
    pbs_attention(q, k, v, PBSConfig(threshold=1.0, segment_size=128)).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    sdpa(q, k, v).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        assert rel_error(got, t.grad) < 1e-5
    monkeypatch.setattr(pipeline, "CPU_GRAD_MAX_KEYS", 1000)
    with pytest.raises(ValueError, match="1024 keys is more than the 1000 allowed"):
        pbs_attention(q, k, v, PBSConfig(threshold=0.9, segment_size=128))


def test_chunked_length_mismatch_suggests_q_offset():
    q, k, v = random_qkv(1, 4, 2, 1024, 32, q_len=1000)
    with pytest.raises(ValueError, match="pass q_offset=24"):
        pbs_attention(q, k, v)
