"""The fused Triton scorer computes the plain-torch function. On a CPU machine it runs under
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
    from flex_pbs.layout import BlockLayout
    from flex_pbs.permutation import key_importance, permute_keys, segment_key_order
    from flex_pbs.scoring import antidiagonal_block_scores
    from flex_pbs.kernels.antidiagonal import antidiagonal_block_scores_fused

    torch.manual_seed(0)
    cases = [  # B, Hq, Hkv, Lk, Lq, D, block, stride, segment, dtype
        (1, 4, 1, 1024, 1024, 32, 128, 8, 256, torch.float32),
        (2, 3, 1, 1000, 1000, 16, 64, 4, 128, torch.float32),   # GQA group of 3 (padded), ragged L
        (1, 2, 2, 1100, 800, 16, 128, 8, 256, torch.float32),   # chunked prefill (q_offset 300)
        (1, 8, 2, 768, 768, 64, 128, 16, 384, torch.float16),
    ]
    for b, hq, hkv, lk, lq, d, bs, s, seg, dtype in cases:
        q = torch.randn(b, hq, lq, d, dtype=dtype)
        k = torch.randn(b, hkv, lk, d, dtype=dtype)
        offset = lk - lq
        order = segment_key_order(key_importance(q, k, bs, d**-0.5, offset), seg)
        k_perm = permute_keys(k, order)
        layout = BlockLayout(lq, lk, offset, bs, seg)
        ref = antidiagonal_block_scores(q.float(), k_perm.float(), order, layout, s, d**-0.5)
        out = antidiagonal_block_scores_fused(q, k_perm, order, layout, s, d**-0.5)
        err = (out - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert err < tol, (b, hq, hkv, lk, lq, d, bs, s, seg, dtype, err)
    # The engine dispatches to it when asked, and selects the same blocks.
    q, k = torch.randn(1, 4, 1024, 32), torch.randn(1, 2, 1024, 32)
    fused = build_plan(q, k, PBSConfig(threshold=0.8, scoring_backend="triton"))
    plain = build_plan(q, k, PBSConfig(threshold=0.8, scoring_backend="torch"))
    assert torch.allclose(fused.block_scores, plain.block_scores, atol=1e-4)
    assert (fused.block_mask != plain.block_mask).float().mean() < 0.01
    print("ok")
    """
)


def test_fused_antidiagonal_matches_plain_torch():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_antidiagonal_on_cuda_bf16():
    from flex_pbs.kernels.antidiagonal import antidiagonal_block_scores_fused
    from flex_pbs.layout import BlockLayout
    from flex_pbs.permutation import identity_key_order
    from flex_pbs.scoring import antidiagonal_block_scores

    q = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16)
    layout = BlockLayout(4096, 4096, 0, 128, 256)
    order = identity_key_order(k)
    ref = antidiagonal_block_scores(q, k, order, layout, 8, 128**-0.5)
    out = antidiagonal_block_scores_fused(q, k, order, layout, 8, 128**-0.5)
    assert (out - ref).abs().max() < 2e-2
