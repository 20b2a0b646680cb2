"""Per-layer thresholds calibrated on a model's own loss (XAttention calibrates per head).

Two stages, both usable on their own:

1. :func:`measure_layer_sensitivity`: for every layer and every candidate threshold, run the
   model with *only that layer* sparse and record its density and the increase in mean
   next-token loss over dense attention.
2. :func:`choose_layer_thresholds`: pick one threshold per layer minimising the summed loss
   increase subject to a mean density budget (a Lagrangian relaxation of the knapsack: each
   layer takes ``argmin Δloss + λ·density`` and λ is bisected to the smallest value meeting
   the budget). It assumes layers' loss increases add up; the joint run is the real test.

``flex-pbs-calibrate`` (:mod:`flex_pbs.runner.calibrate`) runs both on SmolLM2 and writes a
file that ``register(layer_thresholds=path)`` and ``flex-pbs-run layer_thresholds=path`` load.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flex_pbs.engine.config import PBSConfig
from flex_pbs.integrations import transformers as adapter

CALIBRATION_NAME = "flex_pbs_calibration"


@dataclass(frozen=True)
class LayerMeasurement:
    """One layer run sparse at one threshold, every other layer dense."""

    layer: int
    threshold: float
    density: float  # mean over heads of computed / causal blocks
    delta_loss: float  # mean next-token loss minus the dense loss (nats per token)


def _mean_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


def measure_layer_sensitivity(
    model,
    ids: torch.Tensor,
    config: PBSConfig,
    thresholds: Sequence[float],
    layers: Iterable[int] | None = None,
    progress: bool = True,
) -> tuple[float, list[LayerMeasurement]]:
    """Density and loss increase of each layer alone at each threshold.

    Args:
        model: a transformers model that dispatches attention through ``AttentionInterface``.
        ids: ``[1, L]`` calibration tokens.
        config: the engine config; its ``threshold`` is replaced by each candidate.
        thresholds: candidate thresholds, each in (0, 1].
        layers: layer indices to measure (default: all).

    Returns:
        ``(dense mean loss, measurements)``, one measurement per (layer, threshold).
    """
    if not isinstance(config, PBSConfig):
        raise TypeError(f"config must be a PBSConfig, got {type(config).__name__}")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one sequence [1, L], got shape {tuple(ids.shape)}")
    if not thresholds:
        raise ValueError("give at least one candidate threshold")
    for threshold in thresholds:
        config.replace(threshold=threshold)  # validates
    num_layers = int(model.config.num_hidden_layers)
    layers = list(range(num_layers)) if layers is None else list(layers)
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"layers {layers}: the model has layers 0..{num_layers - 1}")
    previous = model.config._attn_implementation
    every_layer = frozenset(range(num_layers))
    try:
        adapter.register(config, name=CALIBRATION_NAME, dense_layers=every_layer, overwrite=True)
        adapter.apply(model, CALIBRATION_NAME)
        dense_loss = _mean_loss(model, ids)  # the same code path with every layer dense
        measurements = []
        grid = [(layer, t) for layer in layers for t in thresholds]
        for layer, threshold in tqdm(grid, desc="calibrate", unit="run", disable=not progress):
            adapter.register(
                config, name=CALIBRATION_NAME, dense_layers=every_layer - {layer},
                layer_thresholds={layer: threshold}, collect_stats=True, overwrite=True,
            )
            loss = _mean_loss(model, ids)
            density = float(adapter.stats(model, CALIBRATION_NAME)[layer].density.mean())
            adapter.reset_stats(CALIBRATION_NAME)
            measurements.append(LayerMeasurement(layer, float(threshold), density, loss - dense_loss))
    finally:
        model.set_attn_implementation(previous)
        with contextlib.suppress(KeyError):
            adapter.unregister(CALIBRATION_NAME)
    return dense_loss, measurements


def _pick(options: dict[int, list[LayerMeasurement]], weight: float) -> dict[int, LayerMeasurement]:
    # Ties go to the denser (safer) option, so that weight 0 means "best loss, then density".
    return {
        layer: min(choices, key=lambda m: (m.delta_loss + weight * m.density, -m.density))
        for layer, choices in options.items()
    }


def _mean_density(picked: dict[int, LayerMeasurement]) -> float:
    return sum(m.density for m in picked.values()) / len(picked)


def choose_layer_thresholds(
    measurements: Sequence[LayerMeasurement], target_density: float
) -> tuple[dict[int, float], dict[str, float]]:
    """One threshold per layer: least summed loss increase with mean density ≤ target.

    Returns:
        ``({layer: threshold}, {"density": predicted mean density, "delta_loss": predicted
        summed loss increase})``. Raises ``ValueError`` if no choice meets the target.
    """
    if not 0 < target_density <= 1:
        raise ValueError(f"target_density must be in (0, 1], got {target_density!r}")
    options: dict[int, list[LayerMeasurement]] = {}
    for m in measurements:
        options.setdefault(m.layer, []).append(m)
    if not options:
        raise ValueError("no measurements to choose from")
    sparsest = {layer: min(choices, key=lambda m: m.density) for layer, choices in options.items()}
    if _mean_density(sparsest) > target_density:
        raise ValueError(
            f"target_density {target_density} is below the sparsest measured choice "
            f"({_mean_density(sparsest):.3f}): measure lower thresholds or raise the target"
        )

    def meets(weight: float) -> bool:
        return _mean_density(_pick(options, weight)) <= target_density

    weight = 0.0
    if not meets(weight):
        # Density falls as the weight grows: bisect between a failing and a meeting weight.
        failing, meeting = 0.0, 1.0
        while not meets(meeting):
            failing, meeting = meeting, meeting * 2
        for _ in range(60):
            middle = (failing + meeting) / 2
            failing, meeting = (failing, middle) if meets(middle) else (middle, meeting)
        weight = meeting
    picked = _pick(options, weight)
    predicted = {"density": _mean_density(picked), "delta_loss": sum(m.delta_loss for m in picked.values())}
    return {layer: m.threshold for layer, m in sorted(picked.items())}, predicted


def measurement_records(measurements: Sequence[LayerMeasurement]) -> list[dict]:
    """JSON-able rows of measurements (what the calibration file stores)."""
    return [asdict(m) for m in measurements]


def measurements_from_records(records: Sequence[dict]) -> list[LayerMeasurement]:
    """Inverse of :func:`measurement_records`."""
    try:
        return [LayerMeasurement(int(r["layer"]), float(r["threshold"]), float(r["density"]), float(r["delta_loss"])) for r in records]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed calibration measurements: {error}") from None
