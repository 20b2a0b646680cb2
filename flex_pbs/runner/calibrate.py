"""``flex-pbs-calibrate``: per-layer thresholds for SmolLM2 at a mean density budget.

Measures every layer alone at every candidate threshold on a calibration window of a text
(held out from evaluation: by default it starts after the first 8192 tokens, which every
evaluation at up to 8K uses), chooses the thresholds (:mod:`flex_pbs.analysis.calibration`), prints
them and writes a file for ``flex-pbs-run layer_thresholds=FILE`` and
``flex_pbs.register(layer_thresholds=FILE)``. The measurements are kept beside it
(``<out stem>.measurements.json``, written before choosing); ``--reuse`` either file re-chooses
for another budget without running the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from flex_pbs.analysis.calibration import (
    choose_layer_thresholds,
    measure_layer_sensitivity,
    measurement_records,
    measurements_from_records,
)
from flex_pbs.engine.methods import METHODS, method_config
from flex_pbs.integrations.layer_thresholds import FORMAT, save_layer_thresholds
from flex_pbs.runner.checks import ArgumentParser, device_problems, fail
from flex_pbs.runner.data import TEXTS, token_ids
from flex_pbs.runner.report import Column, format_table

DEFAULT_THRESHOLDS = (0.7, 0.8, 0.9, 0.97)
MEASUREMENTS_FORMAT = "flex_pbs.calibration_measurements/1"


def measure(args: argparse.Namespace) -> dict:
    """Run the model: the calibration record (everything but the chosen thresholds)."""
    import torch

    from flex_pbs.runner.models import load_smollm2

    config = method_config(args.method)
    model, tokenizer = load_smollm2("sdpa", getattr(torch, args.dtype), args.device)
    ids = token_ids(tokenizer, args.text, args.seq_len, offset=args.offset).to(args.device)
    # Progress bars only on a terminal: redirected stderr gets no carriage returns.
    dense_loss, measurements = measure_layer_sensitivity(
        model, ids, config, args.thresholds, args.layers, progress=sys.stderr.isatty()
    )
    return {
        "model": "SmolLM2-135M-Instruct",
        "method": args.method,
        "engine": dataclasses.asdict(config),
        "text": args.text,
        "seq_len": args.seq_len,
        "offset": args.offset,
        "dense_loss": dense_loss,
        "measurements": measurement_records(measurements),
    }


def measurements_path(out: Path) -> Path:
    """Where the measurements behind ``out`` are kept: ``<out stem>.measurements.json``."""
    return out.with_name(f"{out.stem}.measurements.json")


def reuse(path: Path) -> dict:
    """The calibration record of an earlier thresholds or measurements file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, MEASUREMENTS_FORMAT) or "measurements" not in payload:
        raise ValueError(f"{path} is not a flex-pbs-calibrate file with measurements")
    return {key: value for key, value in payload.items() if key not in ("format", "layer_thresholds", "target_density", "predicted")}


def choice_table(record: dict, thresholds: dict[int, float]) -> str:
    measured = {(m.layer, m.threshold): m for m in measurements_from_records(record["measurements"])}
    rows = [
        {"layer": layer, "threshold": t, "density": measured[layer, t].density, "delta": 1e3 * measured[layer, t].delta_loss}
        for layer, t in thresholds.items()
    ]
    columns = [Column("layer", "layer"), Column("threshold", "threshold"), Column("density", "density", "{:.3f}"),
               Column("delta", "Δ loss (millinats/token)", "{:+.2f}")]
    return format_table(rows, columns)


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for arguments the run would fail on, before any model loads."""
    if not 0 < args.target_density <= 1:
        raise ValueError(f"--target-density must be in (0, 1], got {args.target_density}")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; name the thresholds file to write")
    if args.reuse:
        return  # nothing below is used
    device_problems(args.device, "--device")
    for threshold in args.thresholds:
        try:
            method_config(args.method, threshold=threshold)
        except (TypeError, ValueError) as error:
            message = re.sub(r"^PBSConfig\.", "", str(error))
            raise ValueError(f"--thresholds: {message}") from None
    for option, value, least in (("--seq-len", args.seq_len, 2), ("--offset", args.offset, 0)):
        if value < least:
            raise ValueError(f"{option} must be >= {least}, got {value}")
    for layer in args.layers or ():
        if layer < 0:
            raise ValueError(f"--layers must be >= 0, got {layer}")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="flex-pbs-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--target-density", type=float, required=True, help="mean density budget over layers, in (0, 1]")
    p.add_argument("--out", type=Path, required=True, help="the layer thresholds file to write (JSON)")
    p.add_argument("--reuse", type=Path, help="choose from this earlier file's measurements (no model run)")
    p.add_argument("--method", default="pbs", choices=[m for m in METHODS if m != "dense"], help="engine preset")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), help="candidates per layer")
    p.add_argument("--layers", type=int, nargs="+", help="layers to calibrate (default: all)")
    p.add_argument("--text", default="code", choices=TEXTS)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--offset", type=int, default=8192, help="first calibration token in the text")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``flex-pbs-calibrate``."""
    p = parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
        if args.reuse:
            record = reuse(args.reuse)
        else:
            measured = measurements_path(args.out)
            measured.parent.mkdir(parents=True, exist_ok=True)  # before the costly run
            record = measure(args)
            # The measurements cost many forward passes: keep them whatever the choice gives.
            measured.write_text(json.dumps({"format": MEASUREMENTS_FORMAT, **record}, indent=1) + "\n")
            print(f"measurements: {measured} (choose again with --reuse)")
        thresholds, predicted = choose_layer_thresholds(measurements_from_records(record["measurements"]), args.target_density)
        save_layer_thresholds(args.out, thresholds, target_density=args.target_density, predicted=predicted, **record)
    except (ValueError, OSError) as error:  # bad arguments, a missing, unwritable or broken file
        fail(p.prog, error)
    print(choice_table(record, thresholds))
    print(
        f"\npredicted on the calibration window: mean density {predicted['density']:.3f}, "
        f"loss +{1e3 * predicted['delta_loss']:.1f} millinats/token (if layers add up)\nwritten: {args.out}"
    )


if __name__ == "__main__":
    main()
