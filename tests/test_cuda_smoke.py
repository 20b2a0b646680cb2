"""benchmarks/cuda_smoke.py's checks that need no CUDA-only feature pass on the CPU, at small
lengths: a check that no longer fits the engine (a configuration the default now refuses, keys
in the wrong layout) fails here rather than on a lent GPU."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import cuda_smoke

CHECKS = {
    "exact, 128-blocks": partial(cuda_smoke.exact_vs_sdpa, 64, 2048, "auto"),
    "exact, 128x64 blocks": partial(cuda_smoke.exact_vs_sdpa, 64, 2048, "auto", key_block_size=64),
    "exact, 32-blocks": partial(cuda_smoke.exact_vs_sdpa, 64, 2048, "auto", block_size=32),
    "chunked prefill": partial(cuda_smoke.chunked_exact, 3000, 1001),
    "shared index buffer": partial(cuda_smoke.shared_index_buffer, 3000),
    "shared index buffer, budget": partial(cuda_smoke.shared_index_buffer, 3000, max_density=0.1),
    "default, fp32": partial(cuda_smoke.method_matrix, "pbs", torch.float32, 64, 2000),
    "default, gradients": partial(cuda_smoke.gradients, "pbs", torch.float32, 64, 2048),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_the_check_passes_on_the_cpu(name, monkeypatch):
    monkeypatch.setattr(cuda_smoke, "DEVICE", torch.device("cpu"))
    result = CHECKS[name]()
    assert result["ok"], result
