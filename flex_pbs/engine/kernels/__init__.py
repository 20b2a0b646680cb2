"""Fused GPU kernels (Triton). Imported lazily: the engine runs without Triton."""

import os
from functools import lru_cache
from importlib.util import find_spec

import torch

# An H100's opt-in shared memory per block: what the tiles were tuned for, and the budget used
# where no CUDA device answers (the Triton interpreter in tests).
HOPPER_SHARED_MEMORY = 232448


@lru_cache(maxsize=None)
def triton_available() -> bool:
    return find_spec("triton") is not None


def use_fused(x: torch.Tensor, backend: str) -> bool:
    """Whether a planning stage runs its Triton kernel for ``x``: ``backend="auto"`` on CUDA
    when Triton is installed, ``"triton"`` always (on CPU under ``TRITON_INTERPRET=1``),
    ``"torch"`` never."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ValueError("PBSConfig(backend='triton') needs Triton installed; use backend='auto' or 'torch'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"PBSConfig(backend='triton') needs a CUDA device (inputs are on {x.device}); use "
                "backend='auto' or 'torch' there, or set TRITON_INTERPRET=1 to run the kernels in "
                "Triton's (slow) interpreter"
            )
        return True
    return x.is_cuda and triton_available()


@lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    properties = torch.cuda.get_device_properties(index)
    return getattr(properties, "shared_memory_per_block_optin", HOPPER_SHARED_MEMORY)


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one kernel program may use on ``device``."""
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
