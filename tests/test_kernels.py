"""The fused Triton kernels (importance, gather, antidiagonal scoring, selection + BlockMask indices)
compute the plain-torch functions. On a CPU machine it runs under
Triton's interpreter (fp32/fp16 only: the interpreter has no bf16), in a subprocess because
TRITON_INTERPRET must be set before kernels are defined."""

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="triton not installed")

CHECK = textwrap.dedent(
    """
    import torch
    from flex_pbs import PBSConfig, build_plan
    from flex_pbs.engine.layout import BlockLayout
    from flex_pbs.engine.permute import key_importance, permute_keys, segment_key_order
    from flex_pbs.engine.score import antidiagonal_block_scores
    from flex_pbs.engine.kernels.antidiagonal import antidiagonal_block_scores_fused

    torch.manual_seed(0)
    cases = [  # B, Hq, Hkv, Lk, Lq, D, block, stride, segment, dtype
        (1, 4, 1, 1024, 1024, 32, 128, 8, 256, torch.float32),
        (2, 3, 1, 1000, 1000, 16, 64, 4, 128, torch.float32),   # GQA group of 3 (padded), ragged L
        (1, 2, 2, 1100, 800, 16, 128, 8, 256, torch.float32),   # chunked prefill (q_offset 300)
        (1, 2, 1, 1003, 1003, 16, 64, 8, 128, torch.float32),   # lengths not a multiple of the stride
        (1, 8, 2, 768, 768, 64, 128, 16, 384, torch.float16),
        (1, 2, 1, 640, 640, 16, 64, 2, 64, torch.float32),      # 64-token blocks at stride 2
    ]
    for b, hq, hkv, lk, lq, d, bs, s, seg, dtype in cases:
        q = torch.randn(b, hq, lq, d, dtype=dtype)
        k = torch.randn(b, hkv, lk, d, dtype=dtype)
        offset = lk - lq
        order = segment_key_order(key_importance(q, k, bs, d**-0.5, offset), seg)
        k_perm = permute_keys(k, order)
        layout = BlockLayout(q_len=lq, kv_len=lk, q_offset=offset, block_size=bs, kv_block=bs, segment_size=seg)
        ref = antidiagonal_block_scores(q.float(), k_perm.float(), order, layout, s, d**-0.5)
        out = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5)
        err = (out - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert err < tol, (b, hq, hkv, lk, lq, d, bs, s, seg, dtype, err)
    # Key blocks narrower than query blocks (128 queries x 64 keys; permuted, chunked, ragged).
    for b, hq, hkv, lk, lq, d, bs, kbs, s, seg in [(1, 4, 2, 1100, 800, 32, 128, 64, 8, 256), (1, 2, 1, 1003, 1003, 16, 128, 32, 4, 128)]:
        q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
        order = segment_key_order(key_importance(q, k, bs, d**-0.5, lk - lq), seg)
        k_perm = permute_keys(k, order)
        layout = BlockLayout(q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=bs, kv_block=kbs, segment_size=seg)
        for weight in (0.0, 0.5):
            ref = antidiagonal_block_scores(q, k_perm, order, layout, s, d**-0.5, peak_weight=weight)
            out = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5, peak_weight=weight)
            assert ref.shape[-1] == -(-lk // kbs) and (out - ref).abs().max() < 1e-4, (kbs, weight, (out - ref).abs().max())
    # A peak estimate mixed in: the chunk products kept apart, a second online softmax.
    for b, hq, hkv, lk, lq, d, bs, s, seg in [(1, 4, 2, 1100, 800, 32, 128, 8, 256), (1, 2, 1, 1003, 1003, 16, 64, 8, 64)]:
        q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
        order = segment_key_order(key_importance(q, k, bs, d**-0.5, lk - lq), seg)
        k_perm = permute_keys(k, order)
        layout = BlockLayout(q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=bs, kv_block=bs, segment_size=seg)
        for weight in (0.5, 1.0):
            ref = antidiagonal_block_scores(q, k_perm, order, layout, s, d**-0.5, peak_weight=weight)
            out = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5, peak_weight=weight)
            assert (out - ref).abs().max() < 1e-4, (bs, weight, (out - ref).abs().max())
    # fp8 scoring: the kernel computes the fp32 function of the fp8 operands it was given (the
    # interpreter's own fp8 rounding differs from the GPU's, so the reference dequantises the
    # cast kernels' output: Q scaled per stride slot, K per tensor), and stays near the
    # unquantised scores (e4m3: 3 mantissa bits).
    from flex_pbs.engine.kernels.antidiagonal import _abs_max, _to_fp8, _to_fp8_slots
    for b, hq, hkv, lk, lq, d, bs, s, seg in [(1, 4, 2, 1024, 1024, 32, 128, 8, 256), (1, 2, 1, 1100, 800, 16, 128, 16, 256)]:
        q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
        offset = lk - lq
        order = segment_key_order(key_importance(q, k, bs, d**-0.5, offset), seg)
        k_perm = permute_keys(k, order)
        layout = BlockLayout(q_len=lq, kv_len=lk, q_offset=offset, block_size=bs, kv_block=bs, segment_size=seg)
        amax_k = _abs_max(k_perm).reshape(1)
        q8, q_descale = _to_fp8_slots(q, s)
        slot_max = q.reshape(b, hq, lq // s, s * d).abs().amax(-1)
        assert torch.allclose(q_descale, slot_max / 240)
        q8 = q8.float() * q_descale.repeat_interleave(s, dim=2)[..., None]
        k8 = _to_fp8(k_perm, amax_k).float() * amax_k / 240
        ref = antidiagonal_block_scores(q8, k8, order, layout, s, d**-0.5)
        out = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5, fp8=True)
        assert (out - ref).abs().max() < 1e-4, (out - ref).abs().max()
        ref = antidiagonal_block_scores(q8, k8, order, layout, s, d**-0.5, peak_weight=0.5)
        peak = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5, fp8=True, peak_weight=0.5)
        assert (peak - ref).abs().max() < 1e-4, (peak - ref).abs().max()
        # The casts read strided inputs (transformers hands over [B, L, H, D] transposed) and
        # pad the length with zero rows.
        strided = q.transpose(1, 2).contiguous().transpose(1, 2)
        amax_q = _abs_max(q).reshape(1)
        padded = _to_fp8(strided, amax_q, 48)
        assert padded.shape[2] % 48 == 0 and not padded[:, :, lq:].float().any()
        assert torch.equal(padded[:, :, :lq].float(), _to_fp8(q, amax_q).float())
        ragged, ragged_descale = _to_fp8_slots(strided[:, :, : lq - 5], s)
        assert ragged.shape[2] == lq and not ragged[:, :, lq - 5 :].float().any()
        assert torch.equal(ragged[:, :, : lq - s].float(), _to_fp8_slots(q, s)[0][:, :, : lq - s].float())
        assert torch.equal(ragged_descale[..., :-1], q_descale[..., :-1])
        exact = antidiagonal_block_scores(q, k_perm, order, layout, s, d**-0.5)
        assert (out - exact).abs().max() < 0.1, (out - exact).abs().max()
    # Importance: two-pass kernel equals the materialised softmax.
    import flex_pbs.engine.kernels.importance as importance_kernel
    from flex_pbs.engine.permute import key_importance
    importance_kernel._KEYS_PER_SPLIT = 256  # several key splits, merged
    for b, hq, hkv, lk, lq, d, bs in [(1, 4, 2, 1000, 1000, 32, 128), (2, 3, 1, 700, 500, 16, 64)]:
        q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
        ref = key_importance(q, k, bs, d**-0.5, lk - lq)
        out = importance_kernel.key_importance_fused(q, k, bs, d**-0.5, lk - lq)
        assert (out - ref).abs().max() < 1e-6, (out - ref).abs().max()
    # Gather: whole rows into the permuted layout, from contiguous and transposed (strided) K.
    from flex_pbs.engine.kernels.gather import permute_keys_fused
    for b, h, length, d, dtype in [(2, 3, 1000, 64, torch.float32), (1, 2, 640, 16, torch.float16)]:
        order = segment_key_order(torch.rand(b, h, length), 128)
        x = torch.randn(b, h, length, d).to(dtype)
        strided = torch.randn(b, length, h, d).to(dtype).transpose(1, 2)
        for source in (x, strided):
            out = permute_keys_fused(source, order)
            assert out.is_contiguous() and torch.equal(out, permute_keys(source, order))
    # Selection + index lists: the kernel reproduces the torch stage exactly (no ties here).
    from flex_pbs.engine.permute import permute_stage
    from flex_pbs.engine.score import score_stage
    from flex_pbs.engine.select import select_stage
    from flex_pbs.engine.mask import selection_indices
    from flex_pbs.engine.kernels.select_index import select_and_index_fused
    configs = [
        (1, 4, 2, 1500, 1500, 32, PBSConfig(threshold=0.8, permute="key", segment_size=256, force_local_blocks=0)),
        (2, 3, 1, 1100, 700, 16, PBSConfig(threshold=0.6, permute="key", segment_size=256, force_local_blocks=1)),
        (1, 2, 2, 1300, 1300, 16, PBSConfig(threshold=0.95, max_density=0.3, permute="none")),
        (1, 2, 1, 1024, 1024, 16, PBSConfig(threshold=1.0)),
        (1, 2, 1, 1024, 1024, 16, PBSConfig(threshold=0.7, force_sink=False, scoring="mean")),
        (1, 2, 2, 1300, 1300, 16, PBSConfig(threshold=0.8, threshold_counts_forced=False)),
        (1, 4, 2, 1500, 1200, 32, PBSConfig(threshold=0.8, key_block_size=64, force_local_blocks=8)),
        (1, 2, 1, 1300, 1300, 16, PBSConfig(threshold=0.7, key_block_size=64, permute="key", segment_size=256)),
    ]
    for b, hq, hkv, lk, lq, d, cfg in configs:
        cfg = cfg.replace(backend="torch")
        q, k = torch.randn(b, hq, lq, d) * 2, torch.randn(b, hkv, lk, d)
        layout = BlockLayout.from_config(cfg, lq, lk, lk - lq)
        order, k_perm = permute_stage(q, k, layout, cfg, d**-0.5)
        scores = score_stage(q, k_perm, order, layout, cfg, d**-0.5)
        selected, indices = select_stage(scores, order, layout, cfg)
        fused_selected, fused_indices = select_and_index_fused(scores, order, layout, cfg)
        assert torch.equal(fused_selected, selected), cfg
        counts_ok = torch.equal(fused_indices[0], indices[0]) and torch.equal(fused_indices[2], indices[2])
        assert counts_ok, cfg
        for which in (1, 3):  # the first `count` indices of every row agree
            width = fused_indices[which].shape[-1]  # narrower than nK under a budget
            assert int(indices[which - 1].max()) <= width, cfg
            keep = torch.arange(width) < indices[which - 1][..., None]
            assert torch.equal(fused_indices[which][keep], indices[which][..., :width][keep]), cfg
    # The whole plan with every stage fused equals the plain-torch plan.
    q, k = torch.randn(1, 4, 1024, 32), torch.randn(1, 2, 1024, 32)
    fused = build_plan(q, k, PBSConfig(threshold=0.8, permute="key", segment_size=256, backend="triton"))
    plain = build_plan(q, k, PBSConfig(threshold=0.8, permute="key", segment_size=256, backend="torch"))
    assert torch.equal(fused.key_order, plain.key_order)
    assert torch.allclose(fused.block_scores, plain.block_scores, atol=1e-4)
    assert (fused.block_mask != plain.block_mask).float().mean() < 0.01
    # Attention from the fused index lists (two overlapping views of one buffer) equals attention
    # from the torch lists of the same selection.
    from flex_pbs.engine.mask import build_stage
    from flex_pbs.engine.attend import flex_attend
    v = torch.randn(1, 2, 1024, 32)
    in_order = {"permute": "none", "segment_size": 128, "backend": "triton"}  # keys unpermuted, sparse at 1K
    for cfg in (PBSConfig(threshold=0.8, **in_order), PBSConfig(threshold=0.7, **{**in_order, "segment_size": 256}),
                PBSConfig(threshold=0.8, key_block_size=None, force_local_blocks=4, **in_order),
                PBSConfig(threshold=0.95, max_density=0.2, **in_order),
                PBSConfig(threshold=0.95, max_density=0.05, force_local_blocks=0, **in_order)):
        plan = build_plan(q, k, cfg)
        _, (kv_num, kv_idx, full_num, full_idx) = select_and_index_fused(plan.block_scores, plan.key_order, plan.layout, cfg)
        assert not kv_idx.is_contiguous() and kv_idx.storage().data_ptr() == full_idx.storage().data_ptr()  # one buffer
        # Under a budget the lists are as wide as the most blocks a row can keep, not nK (the
        # CPU kernel gets them widened: it reads no key past the lists' width).
        n_k = plan.layout.num_kv_blocks
        assert full_idx.shape[-1] == n_k if cfg.max_density is None else full_idx.shape[-1] < n_k, cfg
        assert int(full_num.max()) <= full_idx.shape[-1] and int(kv_num.max()) <= kv_idx.shape[-1], cfg
        torch_lists = selection_indices(plan.block_mask, plan.layout.diagonal_blocks(q.device))
        reference_mask = build_stage(torch_lists, plan.key_order, plan.layout, permuted=False)
        out = flex_attend(q, k, v, plan.flex_mask, 32**-0.5)
        assert torch.equal(out, flex_attend(q, k, v, reference_mask, 32**-0.5)), cfg
    print("ok")
    """
)


@pytest.mark.slow  # every kernel under Triton's interpreter
def test_fused_kernels_match_plain_torch():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_antidiagonal_on_cuda_bf16():
    from flex_pbs.engine.kernels.antidiagonal import antidiagonal_block_scores_fused
    from flex_pbs.engine.layout import BlockLayout
    from flex_pbs.engine.permute import identity_key_order
    from flex_pbs.engine.score import antidiagonal_block_scores

    q = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16)
    layout = BlockLayout(q_len=4096, kv_len=4096, q_offset=0, block_size=128, kv_block=128, segment_size=256)
    order = identity_key_order(k)
    ref = antidiagonal_block_scores(q, k, order, layout, 8, 128**-0.5)
    out = antidiagonal_block_scores_fused(q, k, order, layout, 8, 128**-0.5)
    assert (out - ref).abs().max() < 2e-2


def test_shapes_the_kernels_cannot_tile_fall_back_to_torch():
    from flex_pbs.engine.kernels import antidiagonal, importance
    from flex_pbs.engine.layout import BlockLayout

    def layout(block):
        return BlockLayout(q_len=512, kv_len=512, q_offset=0, block_size=block, kv_block=block, segment_size=3 * block)

    q = torch.randn(1, 2, 512, 96)  # head_dim 96: not a power of two
    assert not importance.supports(q) and not antidiagonal.supports(q, layout(128), 8)
    assert not antidiagonal.supports(torch.randn(1, 2, 512, 64), layout(96), 8)  # 12 rows per block
    assert antidiagonal.supports(torch.randn(1, 2, 512, 64), layout(128), 8)
    # fp32 at head_dim 256: no tile fits an H100's shared memory (the compile failed there).
    wide = torch.randn(1, 2, 512, 256)
    assert not importance.supports(wide) and not antidiagonal.supports(wide, layout(128), 8)
    assert importance.supports(wide.bfloat16()) and antidiagonal.supports(wide.bfloat16(), layout(128), 8)


def test_scorer_tiles_are_the_measured_ones_where_they_fit_and_shrink_elsewhere():
    from flex_pbs.engine.kernels import HOPPER_SHARED_MEMORY
    from flex_pbs.engine.kernels.antidiagonal import (
        _launch_options,
        _shared_memory_needed,
    )

    measured = {(2, False): (256, 8, 2), (1, False): (256, 8, 3), (4, False): (64, 8, 2), (2, True): (128, 8, 2)}
    for (itemsize, peak), options in measured.items():  # head_dim 128, 16 key slots per block
        assert _launch_options(itemsize, peak, 128, 16, HOPPER_SHARED_MEMORY) == options
    for itemsize in (1, 2, 4):
        for dim in (16, 64, 128, 256, 512):
            options = _launch_options(itemsize, False, dim, 16, HOPPER_SHARED_MEMORY)
            if options is not None:
                assert _shared_memory_needed(options[0], options[2], dim, itemsize) <= HOPPER_SHARED_MEMORY - 4096
    assert _launch_options(2, False, 256, 16, HOPPER_SHARED_MEMORY)[0] == 64
    assert _launch_options(4, False, 256, 16, HOPPER_SHARED_MEMORY) is None
