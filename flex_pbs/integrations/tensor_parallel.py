"""flex_pbs under transformers' tensor parallelism (``DistributedConfig(tp_size=N)`` or
``tp_plan="auto"`` under ``torchrun``).

PBS works per head, so it rides on transformers' own sharding: each rank's attention layers see
their share of the query and key-value heads (colwise-sharded projections: rank ``r`` holds a
contiguous run of heads) and run PBS on them. GQA groups must stay whole on a rank, so the
number of ranks must divide both head counts. Statistics are per rank; :func:`gather_heads`
puts the heads of all ranks back together in the model's head order.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks the model's heads are sharded over (1 without tensor parallelism)."""
    size = getattr(model, "tp_size", None)
    return size if isinstance(size, int) and size > 1 else 1


def valid_sizes(q_heads: int, kv_heads: int) -> list[int]:
    """Tensor-parallel sizes that keep every GQA group on one rank: divisors of both counts."""
    common = math.gcd(q_heads, kv_heads)
    return [size for size in range(1, common + 1) if common % size == 0]


def check_heads(q_heads: int, kv_heads: int, size: int) -> None:
    """Raise ``ValueError`` unless ``size`` ranks split the heads into whole GQA groups."""
    if size not in valid_sizes(q_heads, kv_heads):
        raise ValueError(
            f"tensor parallelism over {size} ranks would split {q_heads} query / {kv_heads} key-value heads "
            f"unevenly (each rank must hold whole GQA groups); valid sizes: {valid_sizes(q_heads, kv_heads)}"
        )


def model_heads(config: Any) -> tuple[int, int]:
    """``(query heads, key-value heads)`` of a transformers config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    q_heads = config.num_attention_heads
    return q_heads, getattr(config, "num_key_value_heads", None) or q_heads


def _group(model: torch.nn.Module):
    """The process group of the model's tensor-parallel ranks."""
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is None:
        return dist.group.WORLD
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh.get_group("tp") if "tp" in names else mesh.get_group()


def gather_heads(tensor: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """This rank's per-head values ``[H_local]`` → all ranks' ``[H]`` in head order (a
    collective: every rank of the model must call it, in the same order)."""
    if tensor_parallel_size(model) == 1:
        return tensor
    group = _group(model)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def distributed_kwargs(size: int) -> dict[str, Any]:
    """``from_pretrained`` arguments that shard a model over ``size`` ranks (none for 1)."""
    if size == 1:
        return {}
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers before DistributedConfig
        return {"tp_plan": "auto", "tp_size": size}
    return {"distributed_config": DistributedConfig(tp_size=size)}


def rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def init_process_group(device: str) -> None:
    """Join the ``torchrun`` job's process group (gloo on CPU, NCCL on CUDA) if not yet done."""
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def load_sharded(
    build: Callable[[], torch.nn.Module], checkpoint: Path, size: int, device: str, **from_pretrained: Any
) -> torch.nn.Module:
    """A model built on rank 0 by ``build()`` (random weights, say), saved to ``checkpoint``
    once, then loaded by every rank with its heads sharded over ``size`` ranks (transformers'
    tensor parallelism shards only what ``from_pretrained`` loads)."""
    from transformers import AutoModelForCausalLM

    init_process_group(device)
    if rank() == 0 and not (checkpoint / "config.json").exists():
        build().save_pretrained(checkpoint)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **distributed_kwargs(size), **from_pretrained)
    return model.eval()
