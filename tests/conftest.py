import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items):
    """The notebook runs end to end (nbmake): part of the slow set, as the other end-to-end runs."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def random_qkv(batch, q_heads, kv_heads, length, dim, dtype=torch.float32, q_len=None):
    q = torch.randn(batch, q_heads, q_len or length, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, dtype=dtype)
    return q, k, v
