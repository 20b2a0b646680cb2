"""Per-layer thresholds saved to a file: what ``flex-pbs-calibrate`` writes and what
``flex_pbs.register(layer_thresholds=path)`` and the runner's ``layer_thresholds=path`` read.

The file is JSON; only ``layer_thresholds`` (``{"<layer index>": threshold}``) is read back,
the rest (how and on what it was calibrated, the measurements) is there for people::

    {"format": "flex_pbs.integrations.layer_thresholds/1", "layer_thresholds": {"0": 0.95, "1": 0.8, ...}, ...}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

FORMAT = "flex_pbs.integrations.layer_thresholds/1"


def _kind(value: Any) -> str:
    """What a (JSON) value is, in words: "a list", "a string", "null"."""
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "a mapping"}
    return names.get(type(value), f"a {type(value).__name__}")


def check_layer_thresholds(thresholds: Mapping[Any, Any]) -> dict[int, float]:
    """``{layer: threshold}`` with int layers ≥ 0 and thresholds in (0, 1]; raises ``ValueError``."""
    if not isinstance(thresholds, Mapping):
        raise TypeError(f"layer thresholds must be a mapping {{layer: threshold}}, got {type(thresholds).__name__}")
    checked = {}
    for layer, threshold in thresholds.items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"layer {layer!r} is not a layer index") from None
        if index < 0 or str(index) != str(layer).strip():
            raise ValueError(f"layer {layer!r} is not a layer index (an int >= 0)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(
                f"threshold of layer {index} must be in (0, 1], got {threshold!r} ({_kind(threshold)}, not a number)"
            )
        if not 0 < threshold <= 1 or not math.isfinite(threshold):
            raise ValueError(f"threshold of layer {index} must be in (0, 1], got {threshold!r}")
        checked[index] = float(threshold)
    return dict(sorted(checked.items()))


def save_layer_thresholds(path: str | Path, thresholds: Mapping[int, float], **about: Any) -> Path:
    """Write ``thresholds`` (and any JSON-able ``about`` fields) to ``path``; returns the path."""
    path = Path(path)
    checked = check_layer_thresholds(thresholds)
    payload = {"format": FORMAT, "layer_thresholds": {str(k): v for k, v in checked.items()}, **about}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_layer_thresholds(path: str | Path) -> dict[int, float]:
    """``{layer: threshold}`` from a file written by :func:`save_layer_thresholds`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError``, naming the file, for
    one that is not such a file (not JSON, another format, a malformed ``layer_thresholds``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"layer thresholds file {path} does not exist (write one with flex-pbs-calibrate)")
    try:
        payload = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"layer thresholds file {path} is not valid JSON (truncated or not written by flex-pbs-calibrate?): {error}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flex_pbs layer thresholds file (format {FORMAT!r})")
    if "layer_thresholds" not in payload:
        raise ValueError(
            f"layer thresholds file {path} has no 'layer_thresholds' key; expected "
            '{"layer_thresholds": {"<layer index>": <threshold in (0, 1]>, ...}} (write it with flex-pbs-calibrate)'
        )
    thresholds = payload["layer_thresholds"]
    if not isinstance(thresholds, dict):
        raise ValueError(
            f"layer thresholds file {path}: 'layer_thresholds' must be a mapping "
            f'{{"<layer index>": <threshold in (0, 1]>}}, got {_kind(thresholds)}'
        )
    try:
        return check_layer_thresholds(thresholds)
    except ValueError as error:
        raise ValueError(f"layer thresholds file {path}: 'layer_thresholds': {error}") from None
