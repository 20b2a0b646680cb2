"""Structured configs of the experiment runner, and the checks that run before any model loads.

Types live here, values live in ``configs/*.yaml``. Hydra composes the yaml files on top of
these dataclasses (registered in its ConfigStore), so a typo'd key or a value of the wrong type
fails at composition; :func:`validate` then checks the values and builds the method's engine
config, with messages that start with the offending key.

The method node is generated from :class:`~flex_pbs.engine.config.PBSConfig`: ``name`` plus every
PBSConfig field as an optional override (``null`` = the method preset's value), so fields added
to PBSConfig are configurable here without touching this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from flex_pbs.engine.config import PBSConfig
from flex_pbs.engine.methods import METHODS, method_config
from flex_pbs.integrations.layer_thresholds import load_layer_thresholds
from flex_pbs.integrations.tensor_parallel import model_heads, valid_sizes
from flex_pbs.runner.checks import (
    ConfigError,
    device_problems,
    non_negative_int,
    positive_int,
    require,
)
from flex_pbs.runner.data import TEXTS
from flex_pbs.runner.models import (
    SMOLLM2_HEADS,
    TINY_ARCHITECTURES,
    llama_8b_config,
    tiny_config,
)
from flex_pbs.runner.tasks import TASKS

MODEL_SOURCES = ("smollm2", "tiny", "llama8b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEMA_NAME = "run_schema"
TASK_SCHEMA_PREFIX = "task_schema_"


# ------------------------------------------------------------------------------- the schema


_CHECKED_TYPES = (int, float, str, bool)


def optional_field_type(annotation: Any) -> Any:
    """``Optional[T]`` for an annotation OmegaConf can type-check (``T`` or ``T | None`` with
    ``T`` a primitive), ``Any`` otherwise (the value is then checked by PBSConfig itself)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return Optional[args[0]] if len(args) == 1 and args[0] in _CHECKED_TYPES else Any


def method_schema() -> type:
    """The ``MethodConfig`` dataclass: ``name`` plus every PBSConfig field, defaulting to None."""
    hints = typing.get_type_hints(PBSConfig)
    overrides = [
        (f.name, optional_field_type(hints[f.name]), field(default=None)) for f in dataclasses.fields(PBSConfig)
    ]
    if any(name == "name" for name, *_ in overrides):
        raise RuntimeError("PBSConfig has a field called 'name', which the method node reserves")
    return dataclasses.make_dataclass("MethodConfig", [("name", str, field(default=MISSING)), *overrides])


MethodConfig = method_schema()


@dataclass
class ModelConfig:
    """Which model: ``smollm2`` (the real model), ``tiny`` (random weights, ``arch``) or
    ``llama8b`` (random weights, Llama-3.1-8B shapes, ``num_layers`` layers)."""

    name: str = MISSING
    source: str = MISSING
    arch: Optional[str] = None
    num_layers: Optional[int] = None


@dataclass
class RunConfig:
    """The whole run: one method (dense is always evaluated too), one model, one task."""

    method: MethodConfig = MISSING  # type: ignore[valid-type]
    model: ModelConfig = MISSING
    task: Any = MISSING
    device: str = MISSING
    dtype: str = MISSING
    seq_len: int = MISSING
    seed: int = MISSING
    text: str = MISSING
    dense_layers: Any = MISSING
    layer_thresholds: Optional[str] = None
    tp: int = 1


def field_names(schema: type) -> set[str]:
    """The field names of a dataclass."""
    return {f.name for f in dataclasses.fields(schema)}


def misplaced_key_hint(key: str, value: str | None = None) -> str | None:
    """Where a top-level key that the run lacks belongs, as the override to write instead:
    ``method.<key>=<value>`` (a PBSConfig field), ``model.<key>=...`` or ``task.<key>=...``
    (naming the tasks that have it unless all do); None when no node has it (and for ``name``,
    which every node has: ``method=...`` picks a config file)."""
    top = key.split(".", 1)[0]
    if top == "name":
        return None
    assignment = key if value is None else f"{key}={value}"
    hints = [f"{node}.{assignment}" for node, schema in (("method", MethodConfig), ("model", ModelConfig))
             if top in field_names(schema)]
    tasks = [name for name, task in TASKS.items() if top in field_names(task.schema)]
    if tasks:
        which = "" if len(tasks) == len(TASKS) else f" (task={'|'.join(tasks)})"
        hints.append(f"task.{assignment}{which}")
    return " or ".join(hints) or None


def override_text(value: Any) -> str:
    """A config value as a command-line override writes it (``2``, ``true``, ``[0.5]``, ``code``)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return value if isinstance(value, str) else json.dumps(value)


HELP_RESOLVER = "flex_pbs.run_help"


def help_config(*, _root_: DictConfig) -> str:
    """The composed run config as ``flex-pbs-run --help`` shows it (resolver ``${flex_pbs.run_help:}``
    of the help template in ``configs/config.yaml``): Hydra's node left out, and the method
    node's nulls ("the preset's value") replaced by the chosen preset's values from
    :data:`~flex_pbs.engine.methods.METHODS`, so that the help shows what would run; ``dense``
    shows its name alone. Interpolations stay unresolved, as in Hydra's own ``$CONFIG``;
    ``$`` is escaped for the template."""
    config = OmegaConf.to_container(_root_, resolve=False)
    config.pop("hydra", None)
    method = config.get("method")
    if isinstance(method, dict) and method.get("name") in METHODS:
        preset = METHODS[method["name"]]
        if preset is None:
            config["method"] = {key: value for key, value in method.items() if value is not None}
        else:
            config["method"] = {
                key: getattr(preset, key, None) if value is None else value for key, value in method.items()
            }
    return OmegaConf.to_yaml(config).replace("$", "$$")


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore, outside any group so that ``--help`` lists only
    real choices (``configs/config.yaml`` and the task files name them in their defaults), and
    register the resolver of the help text."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConfig)
    for name, task in TASKS.items():
        store.store(name=f"{TASK_SCHEMA_PREFIX}{name}", node=task.schema)
    OmegaConf.register_new_resolver(HELP_RESOLVER, help_config, replace=True)


register_configs()


# --------------------------------------------------------------------------- the validation


@dataclass(frozen=True)
class RunSpec:
    """A validated run: what the tasks read.

    Attributes:
        method: the method's name; engine: its PBSConfig (None for dense);
        overrides: the PBSConfig fields the method node sets.
        task: the task's config (the ``schema`` of one of :data:`~flex_pbs.runner.tasks.TASKS`).
        dense_layers: ``n`` (the first n layers) or a tuple of layer indices run dense.
        tp: ranks the model's heads are sharded over (transformers' tensor parallelism under
            ``torchrun``; 1: one process).
        layer_thresholds: per-layer thresholds (from the ``layer_thresholds`` file, written by
            ``flex-pbs-calibrate``), overriding the method's threshold on those layers.
    """

    method: str
    engine: PBSConfig | None
    overrides: dict[str, Any]
    model: ModelConfig
    task: Any
    device: str
    dtype: torch.dtype
    seq_len: int
    seed: int
    text: str
    dense_layers: int | tuple[int, ...]
    layer_thresholds: dict[int, float] = field(default_factory=dict)
    tp: int = 1


def unknown_key_problems(node: DictConfig, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for a key its schema lacks (``+key=value`` overrides can add
    them), recursing into nested schema nodes."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    known = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in known:
            if not prefix:  # a top-level key that a node has (``+threshold=0.9``) belongs in that node
                nested = misplaced_key_hint(str(key), override_text(OmegaConf.to_container(node, resolve=False)[key]))
                if nested:
                    raise ConfigError(f"{path} is not a configurable key; did you mean {nested}?")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{path} is not a configurable key; {hint}valid keys: {known}")
        if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            unknown_key_problems(node[key], f"{path}.")


def method_engine(method: Any) -> tuple[PBSConfig | None, dict[str, Any]]:
    """``(engine config, overrides)`` of a method node; errors name the ``method.`` key."""
    values = {k: getattr(method, k) for k in (f.name for f in dataclasses.fields(PBSConfig))}
    overrides = {k: v for k, v in values.items() if v is not None}
    require(method.name in METHODS, f"method.name: unknown method {method.name!r}; choose from {sorted(METHODS)}")
    try:
        return method_config(method.name, **overrides), overrides
    except (TypeError, ValueError) as error:
        message = re.sub(r"\bPBSConfig\.", "method.", str(error))
        raise ConfigError(message if message.startswith("method.") else f"method: {message}") from error


def model_problems(model: ModelConfig) -> None:
    """Raise :class:`ConfigError` if the model node is inconsistent."""
    require(model.source in MODEL_SOURCES, f"model.source must be one of {MODEL_SOURCES}, got {model.source!r}")
    if model.source == "tiny":
        require(
            model.arch in TINY_ARCHITECTURES,
            f"model.arch must be one of {sorted(TINY_ARCHITECTURES)} for a tiny model, got {model.arch!r}",
        )
    else:
        require(model.arch is None, f"model.arch applies to tiny models only, got {model.arch!r}")
    if model.source == "smollm2":
        require(model.num_layers is None, "model.num_layers applies to random models only (SmolLM2 has 30)")
    elif model.num_layers is not None:
        positive_int("model.num_layers", model.num_layers)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of a ``dtype`` value: ``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    require(name in DTYPES, f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dense_layers_value(value: Any) -> int | tuple[int, ...]:
    """``dense_layers`` as ``register`` takes it: an int n (first n layers) or layer indices."""
    if isinstance(value, int) and not isinstance(value, bool):
        non_negative_int("dense_layers", value)
        return value
    require(
        isinstance(value, (list, tuple)) or OmegaConf.is_list(value),
        f"dense_layers must be an int (the first n layers) or a list of layer indices, got {value!r}",
    )
    for layer in value:
        non_negative_int("dense_layers[]", layer)
    return tuple(value)


def layer_thresholds_value(path: str | None, engine: PBSConfig | None) -> dict[int, float]:
    """The per-layer thresholds of a ``layer_thresholds`` file (none without a path)."""
    if path is None:
        return {}
    require(engine is not None, "layer_thresholds applies to sparse methods; method=dense has no threshold")
    try:
        return load_layer_thresholds(Path(path).expanduser())
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"layer_thresholds: {error}") from None


# Tasks that run under tensor parallelism: whole-model forward passes and generation.
TENSOR_PARALLEL_TASKS = ("perplexity", "latency", "passkey", "continuation", "retrieval")


def tensor_parallel_problems(tp: Any, task: str, model: ModelConfig) -> None:
    """Raise :class:`ConfigError` unless ``tp`` ranks can run this job: ``torchrun`` started
    that many processes, the task runs sharded, and the model's heads split into whole GQA groups."""
    positive_int("tp", tp)
    if tp == 1:
        return
    launched = os.environ.get("WORLD_SIZE")
    require(
        launched is not None,
        f"tp={tp} shards the model over {tp} processes: start them with "
        f"torchrun --nproc-per-node {tp} -m flex_pbs.runner.cli tp={tp} ...",
    )
    require(
        int(launched) == tp,
        f"tp={tp} but torchrun started {launched} processes: pass tp={launched} or --nproc-per-node {tp}",
    )
    require(task in TENSOR_PARALLEL_TASKS,
            f"task={task} runs in one process; with tp > 1 choose one of {list(TENSOR_PARALLEL_TASKS)}")
    q_heads, kv_heads = model_head_counts(model)
    require(
        tp in valid_sizes(q_heads, kv_heads),
        f"tp={tp}: model {model.name} has {q_heads} query / {kv_heads} key-value heads, which {tp} ranks "
        f"cannot split into whole GQA groups; valid tp: {valid_sizes(q_heads, kv_heads)}",
    )


def model_head_counts(model: ModelConfig) -> tuple[int, int]:
    """``(query heads, key-value heads)`` of a model node, without loading weights."""
    if model.source == "smollm2":
        return SMOLLM2_HEADS
    return model_heads(tiny_config(model.arch) if model.source == "tiny" else llama_8b_config())


def validate(cfg: DictConfig) -> RunSpec:
    """Check a composed run config and return its :class:`RunSpec`; raises :class:`ConfigError`."""
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"validate takes the composed DictConfig, got {type(cfg).__name__}")
    unknown_key_problems(cfg)
    run: RunConfig = OmegaConf.to_object(cfg)
    require(run.task.name in TASKS, f"task.name must be one of {sorted(TASKS)}, got {run.task.name!r}")
    task = TASKS[run.task.name]
    require(
        isinstance(run.task, task.schema),
        f"task: the task file for {run.task.name!r} must extend /{TASK_SCHEMA_PREFIX}{run.task.name}",
    )
    engine, overrides = method_engine(run.method)
    model_problems(run.model)
    positive_int("seq_len", run.seq_len)
    task.check(run.task, run.method.name, run.seq_len)
    require(run.text in TEXTS, f"text must be one of {TEXTS}, got {run.text!r}")
    device_problems(run.device)
    dense_layers = dense_layers_value(run.dense_layers)
    layer_thresholds = layer_thresholds_value(run.layer_thresholds, engine)
    tensor_parallel_problems(run.tp, run.task.name, run.model)
    return RunSpec(
        method=run.method.name,
        engine=engine,
        overrides=overrides,
        model=run.model,
        task=run.task,
        device=run.device,
        dtype=resolve_dtype(run.dtype, run.device),
        seq_len=run.seq_len,
        seed=run.seed,
        text=run.text,
        dense_layers=dense_layers,
        layer_thresholds=layer_thresholds,
        tp=run.tp,
    )
