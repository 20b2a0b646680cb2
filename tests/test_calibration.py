import itertools
import json
import random

import pytest
import torch

import flex_pbs.runner.models
from flex_pbs import PBSConfig
from flex_pbs.analysis.calibration import (
    CALIBRATION_NAME,
    LayerMeasurement,
    choose_layer_thresholds,
    measure_layer_sensitivity,
    measurement_records,
)
from flex_pbs.integrations import transformers as adapter
from flex_pbs.integrations.layer_thresholds import load_layer_thresholds
from flex_pbs.runner import calibrate
from flex_pbs.runner.models import random_model, tiny_config
from flex_pbs.runner.session import byte_tokenizer


def two_layer_measurements():
    # Layer 0 loses little when sparse, layer 1 a lot: the budget should go to layer 1.
    return [
        LayerMeasurement(0, 0.8, 0.2, 0.01), LayerMeasurement(0, 0.95, 0.5, 0.0),
        LayerMeasurement(1, 0.8, 0.2, 0.30), LayerMeasurement(1, 0.95, 0.5, 0.02),
    ]


def test_budget_goes_to_the_sensitive_layer():
    thresholds, predicted = choose_layer_thresholds(two_layer_measurements(), target_density=0.35)
    assert thresholds == {0: 0.8, 1: 0.95}
    assert predicted == pytest.approx({"density": 0.35, "delta_loss": 0.03})


def test_loose_budget_takes_the_least_loss_and_tight_budget_the_sparsest():
    assert choose_layer_thresholds(two_layer_measurements(), 1.0)[0] == {0: 0.95, 1: 0.95}
    assert choose_layer_thresholds(two_layer_measurements(), 0.2)[0] == {0: 0.8, 1: 0.8}
    with pytest.raises(ValueError, match=r"below the sparsest measured choice \(0.200\)"):
        choose_layer_thresholds(two_layer_measurements(), 0.1)
    with pytest.raises(ValueError, match="target_density"):
        choose_layer_thresholds(two_layer_measurements(), 0.0)


def test_choice_is_optimal_for_the_density_it_reaches():
    rng = random.Random(0)
    thresholds = (0.8, 0.9, 0.95)
    measurements = [
        LayerMeasurement(layer, t, rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.1)) for layer in range(5) for t in thresholds
    ]
    by_key = {(m.layer, m.threshold): m for m in measurements}
    sparsest = sum(min(by_key[layer, t].density for t in thresholds) for layer in range(5)) / 5
    for target in (sparsest + 0.02, sparsest + 0.1, sparsest + 0.2):
        chosen, predicted = choose_layer_thresholds(measurements, target)
        assert predicted["density"] <= target
        for combo in itertools.product(thresholds, repeat=5):
            picked = [by_key[layer, t] for layer, t in enumerate(combo)]
            if sum(m.density for m in picked) / 5 <= predicted["density"]:
                assert predicted["delta_loss"] <= sum(m.delta_loss for m in picked) + 1e-12


def tiny_model():
    return random_model(tiny_config("llama", initializer_range=0.1), "sdpa")


def test_measurement_runs_each_layer_alone_and_restores_the_model():
    model = tiny_model()
    ids = torch.randint(0, 1024, (1, 640), generator=torch.Generator().manual_seed(0))
    config = PBSConfig(force_local_blocks=0)
    dense_loss, measured = measure_layer_sensitivity(model, ids, config, [0.5, 1.0], progress=False)
    assert [(m.layer, m.threshold) for m in measured] == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    for m in measured:
        if m.threshold == 1.0:
            assert m.density == 1.0 and m.delta_loss == pytest.approx(0.0, abs=1e-5)
        else:
            assert m.density < 1.0 and m.delta_loss != 0.0
    assert dense_loss > 0
    assert model.config._attn_implementation == "sdpa" and CALIBRATION_NAME not in adapter._REGISTRY
    with pytest.raises(ValueError, match="the model has layers 0..1"):
        measure_layer_sensitivity(model, ids, config, [0.5], layers=[2])
    with pytest.raises(ValueError, match="threshold"):
        measure_layer_sensitivity(model, ids, config, [1.5])


def test_console_script_measures_chooses_writes_and_reuses(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(flex_pbs.runner.models, "load_smollm2", lambda *a, **k: (tiny_model(), byte_tokenizer()))
    first = tmp_path / "calibrated.json"
    calibrate.main(["--target-density", "1.0", "--out", str(first), "--seq-len", "640", "--offset", "0",
                    "--thresholds", "0.5", "1.0", "--method", "xattention"])
    payload = json.loads(first.read_text())
    assert payload["engine"]["force_local_blocks"] == 0 and len(payload["measurements"]) == 4
    least_loss = {
        layer: min((m for m in payload["measurements"] if m["layer"] == layer), key=lambda m: m["delta_loss"])["threshold"]
        for layer in (0, 1)
    }
    assert load_layer_thresholds(first) == least_loss  # a budget of 1.0 constrains nothing
    assert "written" in capsys.readouterr().out
    sparsest = sum(m["density"] for m in payload["measurements"] if m["threshold"] == 0.5) / 2
    sparse = tmp_path / "sparse.json"
    measured = tmp_path / "calibrated.measurements.json"
    assert json.loads(measured.read_text())["measurements"] == payload["measurements"]
    calibrate.main(["--target-density", str(sparsest + 1e-9), "--out", str(sparse), "--reuse", str(measured)])
    assert load_layer_thresholds(sparse) == {0: 0.5, 1: 0.5}
    assert json.loads(sparse.read_text())["measurements"] == payload["measurements"]
    with pytest.raises(SystemExit):
        calibrate.main(["--target-density", "0.01", "--out", str(tmp_path / "x.json"), "--reuse", str(first)])
    assert "below the sparsest" in capsys.readouterr().err


def test_measurements_survive_an_unreachable_budget(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(flex_pbs.runner.models, "load_smollm2", lambda *a, **k: (tiny_model(), byte_tokenizer()))
    out = tmp_path / "t.json"
    with pytest.raises(SystemExit):
        calibrate.main(["--target-density", "0.01", "--out", str(out), "--seq-len", "640", "--offset", "0",
                        "--thresholds", "0.5", "--layers", "1"])
    assert "below the sparsest" in capsys.readouterr().err and not out.exists()
    assert len(json.loads((tmp_path / "t.measurements.json").read_text())["measurements"]) == 1


def test_records_round_trip():
    records = measurement_records(two_layer_measurements())
    assert json.loads(json.dumps(records))[0] == {"layer": 0, "threshold": 0.8, "density": 0.2, "delta_loss": 0.01}
