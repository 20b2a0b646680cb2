"""The loaded model of a run, its tokenizer, its evaluation tokens, and the attention it runs.

The model is loaded once per process and configuration (a Hydra multirun reuses it across
jobs); switching methods only switches ``attn_implementation`` between ``sdpa`` (dense) and a
``flex_pbs`` registration of the method's engine config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

import flex_pbs
from flex_pbs.runner import models
from flex_pbs.runner.checks import ConfigError
from flex_pbs.runner.data import token_ids

if TYPE_CHECKING:
    from flex_pbs.runner.schema import ModelConfig, RunSpec

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A loaded model.

    Attributes:
        tokenizer: the model's tokenizer; for random-weight models, a byte-level tokenizer
            (ByT5's) used only to build passkey prompts.
        random_weights: True for models built from a config (no trained weights).
    """

    model: Any
    tokenizer: Any
    random_weights: bool
    device: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def random_model_config(model: ModelConfig):
    """The transformers config of a random-weight model node."""
    layers = {} if model.num_layers is None else {"num_hidden_layers": model.num_layers}
    if model.source == "tiny":
        return models.tiny_config(model.arch, **layers)
    if model.source == "llama8b":
        return models.llama_8b_config(**layers)
    raise ValueError(f"model.source {model.source!r} is not a random-weight model")


def byte_tokenizer():
    """A byte-level tokenizer needing no files (ByT5's: 259 ids for bytes and specials)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


_LOADED: dict[tuple, Session] = {}


def smollm2_session(dtype: torch.dtype = torch.float32, device: str = "cpu", tensor_parallel: int = 1) -> Session:
    """A session on the bundled SmolLM2-135M-Instruct, in eval mode with ``sdpa`` attention."""
    model, tokenizer = models.load_smollm2("sdpa", dtype, device, tensor_parallel)
    return Session(model, tokenizer, random_weights=False, device=model_device(device))


def model_device(device: str) -> str:
    """Where a rank's tensors live: under ``torchrun`` on CUDA, the rank's own GPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def random_session(spec: RunSpec) -> Session:
    """A session on a seeded random-weight model; under tensor parallelism it is saved once (in
    the temporary directory) and loaded sharded, as transformers shards only what it loads."""
    def build():
        return models.random_model(random_model_config(spec.model), "sdpa", seed=spec.seed, dtype=spec.dtype)

    if spec.tp == 1:
        model = build().to(spec.device)
    else:
        from flex_pbs.integrations.tensor_parallel import load_sharded

        name = f"{spec.model.name}-{spec.model.arch}-{spec.model.num_layers}-seed{spec.seed}-{str(spec.dtype)[6:]}"
        checkpoint = Path(tempfile.gettempdir()) / "flex_pbs_random_models" / name
        model = load_sharded(build, checkpoint, spec.tp, spec.device, dtype=spec.dtype, attn_implementation="sdpa")
    return Session(model, byte_tokenizer(), random_weights=True, device=model_device(spec.device))


def load_session(spec: RunSpec) -> Session:
    """Load (or reuse) the model of a run, in eval mode with ``sdpa`` attention (with ``tp > 1``
    its heads sharded over the job's ranks)."""
    seed = None if spec.model.source == "smollm2" else spec.seed
    key = (spec.model.source, spec.model.arch, spec.model.num_layers, spec.dtype, spec.device, seed, spec.tp)
    if key not in _LOADED:
        _LOADED.clear()
        log.info("loading model %s", spec.model.name)
        if spec.model.source == "smollm2":
            session = smollm2_session(spec.dtype, spec.device, spec.tp)
        else:
            session = random_session(spec)
        _LOADED[key] = session
    session = _LOADED[key]
    layer_problems(spec, session)
    return session


def layer_problems(spec: RunSpec, session: Session) -> None:
    """Raise :class:`ConfigError` for layer indices or lengths the loaded model does not have."""
    layers = session.num_layers
    named = spec.dense_layers if isinstance(spec.dense_layers, tuple) else ()
    task_layers = tuple(getattr(spec.task, "layers", None) or ())
    calibrated = tuple(spec.layer_thresholds)
    for key, indices in (("dense_layers", named), ("task.layers", task_layers), ("layer_thresholds", calibrated)):
        if any(i >= layers for i in indices):
            raise ConfigError(f"{key} {list(indices)}: the model has layers 0..{layers - 1}")
    if isinstance(spec.dense_layers, int) and spec.dense_layers > layers:
        raise ConfigError(f"dense_layers={spec.dense_layers} exceeds the model's {layers} layers")
    longest = max([spec.seq_len, *getattr(spec.task, "lengths", [])])
    limit = getattr(session.model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ConfigError(f"seq_len/task.lengths: {longest} tokens exceed the model's {limit} positions")


def evaluation_ids(spec: RunSpec, session: Session) -> torch.Tensor:
    """``[1, seq_len]`` tokens to evaluate: the configured text for a trained model; seeded
    uniform random ids for a random-weight model (it has no tokenizer worth the name)."""
    if session.random_weights:
        generator = torch.Generator().manual_seed(spec.seed)
        ids = torch.randint(0, session.model.config.vocab_size, (1, spec.seq_len), generator=generator)
    else:
        ids = token_ids(session.tokenizer, spec.text, spec.seq_len)
    return ids.to(session.device)


@contextlib.contextmanager
def attention(
    session: Session,
    engine: flex_pbs.PBSConfig | None,
    dense_layers: int | tuple[int, ...] = 0,
    layer_thresholds: dict[int, float] | None = None,
    collect_stats: bool = False,
    recall: bool = False,
) -> Iterator[None]:
    """Run the model with a method's attention inside the block: SDPA when ``engine`` is None,
    otherwise ``flex_pbs`` registered with ``engine`` (stats and recall as asked). The model is
    back on SDPA, and the registration removed, afterwards."""
    if engine is None:
        session.model.set_attn_implementation("sdpa")
        yield
        return
    flex_pbs.register(
        engine, dense_layers=dense_layers, layer_thresholds=layer_thresholds, collect_stats=collect_stats,
        stats_recall=recall, overwrite=True,
    )
    try:
        flex_pbs.apply(session.model)
        yield
    finally:
        session.model.set_attn_implementation("sdpa")
        flex_pbs.unregister()
