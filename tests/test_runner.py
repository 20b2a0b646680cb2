"""The experiment runner: config composition and validation, every task on a tiny random model,
the console scripts end to end (a run and a sweep), and the configs shipping in the wheel."""

import csv
import dataclasses
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException

import flex_pbs.runner.models
from flex_pbs import PBSConfig
from flex_pbs.engine.methods import METHODS, method_config
from flex_pbs.integrations.layer_thresholds import save_layer_thresholds
from flex_pbs.runner import session
from flex_pbs.runner.checks import ConfigError
from flex_pbs.runner.job import run_job
from flex_pbs.runner.schema import MethodConfig, validate
from flex_pbs.runner.sweep import summarize

REPO = Path(__file__).parents[1]
SCRIPTS = Path(sys.executable).parent
# Small enough for seconds per task, long enough (3+ segments of 256 keys) for PBS to skip blocks.
TINY = ["model=tiny_llama", "seq_len=640"]
TINY_PERPLEXITY = [*TINY, "task.tail_tokens=256", "task.passkey_trials=0"]
# At 640 tokens the default's forced local window covers nearly every block: drop it where a
# test needs blocks to be skipped.
SPARSE = ["method.threshold=0.5", "method.force_local_blocks=0"]


def composed(overrides):
    with initialize_config_module(config_module="flex_pbs.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def run(overrides, out_dir):
    return run_job(composed(overrides), out_dir, overrides)


def rows_by_method(payload):
    return {row["method"]: row for row in payload["rows"]}


# ---------------------------------------------------------------------------- configuration


def test_method_node_has_every_pbsconfig_field():
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    assert fields == {"name"} | {f.name for f in dataclasses.fields(PBSConfig)}


def test_method_files_are_a_name_and_nothing_else():
    files = sorted((REPO / "configs" / "method").glob("*.yaml"))
    assert {f.stem for f in files} == set(METHODS)
    for f in files:
        assert yaml.safe_load(f.read_text()) == {"name": f.stem}


def test_default_config():
    spec = validate(composed([]))
    assert (spec.method, spec.model.name, spec.task.name, spec.text, spec.device) == (
        "pbs", "smollm2", "perplexity", "code", "cpu"
    )
    assert spec.engine == PBSConfig() and spec.overrides == {}
    assert spec.seq_len == 2048 and str(spec.dtype) == "torch.float32"


def test_method_overrides_reach_the_engine():
    spec = validate(composed(["method=xattention", "method.threshold=0.8", "method.stride=16"]))
    assert spec.engine == method_config("xattention", threshold=0.8, stride=16)
    assert spec.overrides == {"threshold": 0.8, "stride": 16}


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["method.name=foo"], ConfigError, r"method.name: unknown method 'foo'; choose from \['dense'"),
        (["seq_len=-5"], ConfigError, r"seq_len must be > 0, got -5"),
        (["method.threshold=1.5"], ConfigError, r"method.threshold must be in \(0, 1\], got 1.5"),
        (["method.segment_size=100"], ConfigError, r"method.segment_size \(100\) must be a multiple"),
        (["method=dense", "method.threshold=0.5"], ConfigError, r"method 'dense' takes no engine options"),
        (["+method.treshold=0.5"], ConfigError, r"method.treshold is not a configurable key; did you mean method.threshold"),
        (["+task.tail_tokenz=5"], ConfigError, r"task.tail_tokenz is not a configurable key"),
        (["+threshold=0.5"], ConfigError, r"threshold is not a configurable key; did you mean method.threshold=0.5\?"),
        (["task=passkey", "+depths=[0.5]"], ConfigError, r"did you mean task.depths=\[0.5\] \(task=passkey\)\?"),
        (["model=tiny_llama", "model.arch=gpt2"], ConfigError, r"model.arch must be one of"),
        (["task=passkey", "task.depths=[0.5,1.5]"], ConfigError, r"task.depths\[\] must be in \[0, 1\], got 1.5"),
        (["task=attention_stats", "method=dense"], ConfigError, r"attention_stats .* dense has none"),
        (["dense_layers=-1"], ConfigError, r"dense_layers must be >= 0"),
        (["text=poetry"], ConfigError, r"text must be one of"),
        (["method=foo"], MissingConfigException, r"method/foo"),
        (["method.treshold=0.5"], ConfigCompositionException, r"method.treshold"),
        (["method.threshold=abc"], ConfigCompositionException, r"method.threshold"),
    ],
)
def test_bad_config_fails_before_any_model_loads(monkeypatch, tmp_path, overrides, error, message):
    loads = []
    monkeypatch.setattr(flex_pbs.runner.models, "load_smollm2", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(flex_pbs.runner.models, "random_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(session, "_LOADED", {})
    with pytest.raises(error, match=message):
        run(overrides, tmp_path)
    assert loads == [] and not (tmp_path / "results.json").exists()


def test_layer_indices_are_checked_against_the_loaded_model(tmp_path):
    with pytest.raises(ConfigError, match=r"dense_layers \[5\]: the model has layers 0..1"):
        run([*TINY_PERPLEXITY, "dense_layers=[5]"], tmp_path)


# ------------------------------------------------------------------------------------ tasks


def test_perplexity_task(tmp_path):
    payload = run([*TINY, "task.tail_tokens=256", "task.passkey_trials=2", *SPARSE], tmp_path)
    dense, pbs = payload["rows"]
    assert (dense["method"], pbs["method"]) == ("dense", "pbs")
    assert pbs["threshold"] == 0.5 and pbs["engine"]["scoring"] == "antidiagonal"
    assert dense["density"] == 1.0 and 0 < pbs["density"] < 1 and 0 < pbs["recall"] < 1
    assert dense["delta_pct"] == 0 and pbs["delta_pct"] != 0
    assert all(math.isfinite(r["perplexity"]) and math.isfinite(r["tail_perplexity"]) for r in payload["rows"])
    assert pbs["tail_tokens"] == 256 and pbs["passkey_trials"] == 2 and 0 <= pbs["passkey"] <= 1
    assert payload["details"]["pbs"]["stats"]["paths"] == {"pbs": 2}
    assert any("random weights" in note for note in payload["notes"])
    for name in ("results.json", "results.csv", "results.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_threshold_one_reproduces_dense_perplexity(tmp_path):
    rows = rows_by_method(run([*TINY_PERPLEXITY, "task.recall=false", "method.threshold=1.0"], tmp_path))
    assert rows["pbs"]["perplexity"] == pytest.approx(rows["dense"]["perplexity"], rel=1e-5)
    assert rows["pbs"]["density"] == 1.0 and rows["pbs"]["recall"] is None


def test_dense_layers_run_dense(tmp_path):
    payload = run([*TINY_PERPLEXITY, "task.recall=false", *SPARSE, "dense_layers=[0]"], tmp_path)
    layers = payload["details"]["pbs"]["stats"]["layers"]
    assert layers[0]["path"] == "dense" and set(layers[0]["density"]) == {1.0}
    assert layers[1]["path"] == "pbs" and max(layers[1]["density"]) < 1


def test_layer_thresholds_file_overrides_the_method_threshold_per_layer(tmp_path):
    path = save_layer_thresholds(tmp_path / "calibrated.json", {0: 1.0})
    payload = run([*TINY_PERPLEXITY, "task.recall=false", *SPARSE, f"layer_thresholds={path}"], tmp_path)
    layers = payload["details"]["pbs"]["stats"]["layers"]
    assert set(layers[0]["density"]) == {1.0} and max(layers[1]["density"]) < 1
    with pytest.raises(ConfigError, match=r"layer_thresholds: .* does not exist"):
        run([*TINY_PERPLEXITY, f"layer_thresholds={tmp_path / 'missing.json'}"], tmp_path)
    far = save_layer_thresholds(tmp_path / "far.json", {7: 0.9})
    with pytest.raises(ConfigError, match=r"layer_thresholds \[7\]: the model has layers 0..1"):
        run([*TINY_PERPLEXITY, f"layer_thresholds={far}"], tmp_path)


def test_dense_method_alone(tmp_path):
    payload = run([*TINY_PERPLEXITY, "method=dense"], tmp_path)
    assert [r["method"] for r in payload["rows"]] == ["dense"]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_passkey_task(tmp_path):
    payload = run([*TINY, "task=passkey", "task.lengths=[600]", "task.depths=[0.25,0.75]", "task.trials=1"], tmp_path)
    assert [(r["method"], r["length"]) for r in payload["rows"]] == [("dense", 600), ("pbs", 600)]
    for row in payload["rows"]:
        trials = payload["details"][row["method"]]
        assert len(trials) == 2 and all(isinstance(t["output"], str) and t["length"] <= 600 for t in trials)
        # Each cell is the share of its trials whose output holds the pass key.
        for depth in (0.25, 0.75):
            hits = [t["correct"] for t in trials if t["depth"] == depth]
            assert row[f"depth_{depth:g}"] == sum(hits) / len(hits)
        assert row["accuracy"] == sum(t["correct"] for t in trials) / 2
        assert all(t["correct"] == (str(t["passkey"]) in t["output"]) for t in trials)
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_passkey_plot_keeps_identical_series_apart(monkeypatch, tmp_path):
    """Methods with the same accuracies must not hide each other: each series has its own
    marker and sits slightly beside the others, near its depth."""
    from matplotlib.figure import Figure

    from flex_pbs.runner.tasks import passkey

    figures = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(passkey, "Figure", Recorded)
    depth_keys = [("depth_0.1", 0.1), ("depth_0.5", 0.5), ("depth_0.9", 0.9)]
    same = {"depth_0.1": 1.0, "depth_0.5": 1.0, "depth_0.9": 0.5}
    rows = [{"method": m, "length": 4096, **same} for m in ("dense", "pbs", "xattention")]
    passkey.plot_passkey(rows, depth_keys, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").read_bytes()[:8] == PNG_MAGIC
    (figure,) = figures
    lines = figure.axes[0].get_lines()
    assert len(lines) == 3
    assert len({line.get_marker() for line in lines}) == 3
    xs = [tuple(line.get_xdata()) for line in lines]
    assert len(set(xs)) == 3
    for x in xs:
        assert x == pytest.approx([0.1, 0.5, 0.9], abs=0.05)
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 1.0, 0.5]] * 3  # the values stay exact


def test_attention_stats_task(tmp_path):
    from flex_pbs import build_plan
    from flex_pbs.integrations.capture import capture_qkv
    from flex_pbs.runner.session import evaluation_ids, load_session

    overrides = ["model=tiny_qwen2", "seq_len=640", "task=attention_stats", *SPARSE]
    payload = run(overrides, tmp_path)
    assert [r["layer"] for r in payload["rows"]] == [0, 1]
    # The rows are the plans of the method on the model's own Q/K, layer by layer.
    spec = validate(composed(overrides))
    model_session = load_session(spec)
    captured = capture_qkv(model_session.model, evaluation_ids(spec, model_session))
    for row in payload["rows"]:
        q, k, _ = captured[row["layer"]]
        head_density = build_plan(q, k, spec.engine).head_density.mean(0)
        details = payload["details"]["layers"][row["layer"]]
        assert details["density"] == pytest.approx(head_density.tolist(), abs=1e-6)
        assert row["density"] == pytest.approx(float(head_density.mean()), abs=1e-6)
        assert row["min_head_density"] == pytest.approx(float(head_density.min()), abs=1e-6)
        assert 0 < row["density"] < 1 and len(details["recall"]) == 4 and 0 < row["recall"] <= 1
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_latency_task(tmp_path):
    import statistics

    rows = rows_by_method(run([*TINY, "task=latency", "task.repeats=3"], tmp_path))
    for row in rows.values():
        assert len(row["times_s"]) == 3 and row["prefill_s"] == statistics.median(row["times_s"])
        assert row["min_s"] == min(row["times_s"]) and row["compile_s"] == max(0.0, row["warmup_s"] - row["prefill_s"])
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["density"] == 1.0
    assert rows["pbs"]["speedup"] == pytest.approx(rows["dense"]["prefill_s"] / rows["pbs"]["prefill_s"])
    assert 0 < rows["pbs"]["density"] <= 1


# ---------------------------------------------------------------------------- console scripts


def script(name, *args, cwd):
    done = subprocess.run([str(SCRIPTS / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_console_script_run(tmp_path):
    out = tmp_path / "run"
    stdout = script("flex-pbs-run", *TINY, "task.tail_tokens=256", "task.passkey_trials=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert "| method | context | perplexity | Δ vs dense (%)" in stdout and "| dense " in stdout and "| pbs " in stdout
    payload = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["dense", "pbs"]
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == ["dense", "pbs"] and "engine.threshold" in table[0]
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.slow
def test_console_script_sweep_and_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    script(
        "flex-pbs-run", "-m", *TINY_PERPLEXITY, "task.recall=false", "method.threshold=0.4,0.7",
        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.json")) == ["0", "1"]
    stdout = script("flex-pbs-sweep", str(sweep_dir), cwd=tmp_path)
    assert "threshold=0.4" in stdout and "threshold=0.7" in stdout
    with open(sweep_dir / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["threshold"]) for r in rows] == [("dense", ""), ("pbs", "0.4"), ("pbs", "0.7")]
    assert (sweep_dir / "sweep.png").stat().st_size > 0 and "| dense" in (sweep_dir / "sweep.md").read_text()


def test_sweep_of_an_empty_directory_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="flex-pbs-run -m"):
        summarize(tmp_path)


@pytest.mark.slow
def test_configs_ship_in_the_wheel(tmp_path):
    pip = [sys.executable, "-m", "pip", "wheel", str(REPO), "-w", str(tmp_path), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("flex_pbs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"flex_pbs/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert expected and expected <= names
    modules = {str(p.relative_to(REPO)) for p in (REPO / "flex_pbs").rglob("*.py")}  # every subpackage
    assert modules and modules | {"flex_pbs/configs/__init__.py"} <= names


def test_untimed_perplexity_runs_one_pass_per_method(tmp_path):
    """task.timed=false (for quality sweeps): no wall time, stats still collected."""
    payload = run([*TINY_PERPLEXITY, "task.timed=false", *SPARSE], tmp_path)
    rows = rows_by_method(payload)
    assert rows["dense"]["wall_s"] is None and rows["pbs"]["wall_s"] is None
    assert 0 < rows["pbs"]["density"] < 1 and rows["pbs"]["recall"] is not None


def test_sweep_lines_split_on_engine_fields_other_than_the_threshold():
    from flex_pbs.runner.sweep import curves

    def row(method, threshold, local, density):
        engine = {**dataclasses.asdict(PBSConfig()), "threshold": threshold, "force_local_blocks": local}
        return {"method": method, "engine": engine, "seq_len": 8192, "model": "smollm2", "density": density}

    rows = [row("xattention", t, local, 0.1 * t + local / 100) for t in (0.8, 0.9) for local in (0, 4)]
    lines = curves(rows + [row("pbs", 0.9, 0, 0.2)])
    assert set(lines) == {"xattention, force_local_blocks=0", "xattention, force_local_blocks=4", "pbs"}
    assert [p["point_label"] for p in lines["xattention, force_local_blocks=4"]] == ["threshold=0.8", "threshold=0.9"]
    calibrated = {**row("pbs", 0.9, 0, 0.18), "layer_thresholds": "runs/code4k_t35.json"}
    assert set(curves([row("pbs", 0.9, 0, 0.2), calibrated])) == {
        "pbs, layer_thresholds=None", "pbs, layer_thresholds=code4k_t35"
    }
    texts = [{**row("pbs", 0.9, 4, 0.25), "text": text} for text in ("code", "prose")]
    assert set(curves(texts)) == {"pbs, code", "pbs, prose"}


@pytest.mark.parametrize("sweep", ["pareto", "table", "presets"])
def test_sweep_configs_sweep_named_methods(sweep):
    """Every shipped sweep composes and sweeps methods that exist, with valid thresholds."""
    from flex_pbs.engine.methods import METHODS

    with initialize_config_module(config_module="flex_pbs.configs", version_base=None):
        cfg = compose("config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params.method.split(",")) <= set(METHODS)
    assert all(0 < float(t) <= 1 for t in str(params["method.threshold"]).split(","))
