"""Fused GPU kernels (Triton). Imported lazily: the engine runs without Triton."""

from functools import lru_cache
from importlib.util import find_spec


@lru_cache(maxsize=None)
def triton_available() -> bool:
    return find_spec("triton") is not None
