"""The runner's console scripts as a user meets them: a user's mistake (a bad value or key, a bad
argument, a missing or broken file) is one line on stderr and exit status 2, no traceback;
``flex-pbs-run --help`` shows the chosen method's preset values; redirected stderr carries no
progress bars."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flex_pbs.runner.models
from flex_pbs.analysis.calibration import LayerMeasurement, measurement_records
from flex_pbs.engine.methods import METHODS
from flex_pbs.runner import calibrate, sweep
from flex_pbs.runner.calibrate import MEASUREMENTS_FORMAT

SCRIPTS = Path(sys.executable).parent
TINY = ["model=tiny_llama", "seq_len=640"]


def console(name, *args, cwd):
    return subprocess.run([str(SCRIPTS / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def user_error(name, *args, cwd):
    """The one stderr line of a console script that must fail with exit status 2."""
    done = console(name, *args, cwd=cwd)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"{name}: "), lines[0]
    return lines[0]


def user_error_in_process(main, name, args, capsys):
    """The same for the script's ``main(argv)`` called here (cheaper than a process per case)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{name}: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- flex-pbs-run


@pytest.mark.slow  # a console script in a subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["seq_len=-5"], "seq_len must be > 0, got -5"),
        (["method.threshold=1.5"], "method.threshold must be in (0, 1], got 1.5"),
        # raised once the model is loaded (the session's checks)
        ([*TINY, "dense_layers=[5]"], "dense_layers [5]: the model has layers 0..1"),
        # in a sweep: the job is named
        (["-m", "seq_len=-5"], "seq_len must be > 0, got -5"),
    ],
)
def test_run_validation_error_is_one_line(tmp_path, args, message):
    line = user_error("flex-pbs-run", *args, "hydra.run.dir=run", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert message in line
    assert not list(tmp_path.rglob("results.json"))
    if "-m" in args:
        assert "job 0 (seq_len=-5)" in line


@pytest.mark.slow  # a console script in a subprocess
@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("threshold=2", "method.threshold=2"),  # Hydra alone says "use +threshold=2"
        ("+threshold=2", "method.threshold=2"),  # validation alone said "did you mean layer_thresholds?"
    ],
)
def test_run_suggests_the_method_node_for_a_method_field(tmp_path, override, suggestion):
    line = user_error("flex-pbs-run", override, "hydra.run.dir=run", cwd=tmp_path)
    assert line == f"flex-pbs-run: threshold is not a configurable key; did you mean {suggestion}?"


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["key_block_size=64"], "method.key_block_size=64"),
        (["-m", "threshold=0.8,0.9"], "method.threshold=0.8,0.9"),
        (["task=passkey", "lengths=[600]"], "task.lengths=[600] (task=passkey|retrieval)"),
        (["tail_tokens=5"], "task.tail_tokens=5 (task=perplexity)"),
        (["recall=false"], "task.recall=false (task=perplexity|continuation|attention_stats)"),
        (["arch=qwen2", "--cfg", "job"], "model.arch=qwen2"),
    ],
)
def test_misplaced_override_names_the_node(argv, suggestion):
    from flex_pbs.runner.cli import misplaced_override

    key = suggestion.split(".", 1)[1].split("=", 1)[0]
    assert misplaced_override(argv) == f"{key} is not a configurable key; did you mean {suggestion}?"


@pytest.mark.slow  # a console script in a subprocess
def test_other_overrides_are_left_to_hydra(tmp_path):
    from flex_pbs.runner.cli import misplaced_override

    for argv in (["thresholdz=2"], ["name=pbs"], ["+sweep=presets", "-m"], ["method.threshold=0.5"], ["seed=1"],
                 ["hydra.run.dir=x", "--help"], ["+threshold=2"], ["~threshold"], ["--cfg", "job"], ["threshold=["]):
        assert misplaced_override(argv) is None, argv
    done = console("flex-pbs-run", "thresholdz=2", "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode != 0 and "thresholdz" in done.stderr and "did you mean method" not in done.stderr


def help_config(*args, cwd):
    """The config section of ``flex-pbs-run [args] --help``, parsed."""
    done = console("flex-pbs-run", *args, "--help", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    config = done.stdout.split("== Config ==", 1)[1].split("Powered by Hydra", 1)[0]
    body = config.split("\n\n", 1)[1]  # after the paragraph on overrides
    return done.stdout, yaml.safe_load(body)


@pytest.mark.slow  # a console script in a subprocess
@pytest.mark.parametrize("method", ["pbs", "xattention"])
def test_help_shows_the_preset_values_of_the_chosen_method(tmp_path, method):
    text, config = help_config(*([] if method == "pbs" else [f"method={method}"]), cwd=tmp_path)  # pbs: the default
    assert config["method"] == {"name": method, **dataclasses.asdict(METHODS[method])}
    assert config["task"]["name"] == "perplexity" and config["seq_len"] == 2048
    if method == "pbs":
        assert "  threshold: 0.9\n" in text and "  key_block_size: 64\n" in text and "  block_size: 128\n" in text
    if method == "xattention":  # square blocks: key blocks = block_size
        assert "  key_block_size: null\n" in text and "  block_size: 128\n" in text
        assert "  force_local_blocks: 0\n" in text


@pytest.mark.slow  # a console script in a subprocess
def test_help_shows_overrides_over_the_preset_and_keeps_interpolations(tmp_path):
    _, config = help_config("method.threshold=0.5", "task=passkey", cwd=tmp_path)
    assert config["method"] == {"name": "pbs", **dataclasses.asdict(METHODS["pbs"].replace(threshold=0.5))}
    assert config["task"]["lengths"] == ["${seq_len}"]
    _, dense = help_config("method=dense", cwd=tmp_path)
    assert dense["method"] == {"name": "dense"}  # exact attention has no engine fields


@pytest.mark.slow
def test_redirected_stderr_gets_no_progress_bars(tmp_path):
    done = console("flex-pbs-run", *TINY, "task=latency", "task.repeats=2", "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr and "it/s" not in done.stderr, repr(done.stderr[:500])


# --------------------------------------------------------------------------- flex-pbs-sweep


def results(task="perplexity", **changes):
    row = {"method": "pbs", "threshold": 0.9, "engine": {"threshold": 0.9}, "seq_len": 640, "perplexity": 10.0,
           "tail_perplexity": 11.0, "tail_tokens": 256, "density": 0.5}
    payload = {"task": task, "overrides": ["method.threshold=0.9"], "config": {"model": {"name": "tiny"}, "text": "code"},
               "rows": [{**row, "method": "dense", "engine": None, "density": 1.0}, row]}
    payload.update(changes)
    return payload


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.slow  # a console script in a subprocess
def test_sweep_of_a_truncated_results_file_names_it(tmp_path):
    write(tmp_path / "sweep" / "0" / "results.json", json.dumps(results()))
    broken = write(tmp_path / "sweep" / "1" / "results.json", json.dumps(results())[:100])
    line = user_error("flex-pbs-sweep", "sweep", cwd=tmp_path)
    assert str(Path("sweep") / "1" / "results.json") in line and "not valid JSON" in line
    assert broken.exists()


@pytest.mark.parametrize(
    "payload, key",
    [
        ({k: v for k, v in results().items() if k != "rows"}, "'rows'"),
        (results(config={"text": "code"}), "'config.model'"),
        (results(rows=[{k: v for k, v in results()["rows"][1].items() if k != "density"}]), "rows[0] (method pbs) has no key 'density'"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_sweep_of_a_results_file_missing_a_key_names_file_and_key(monkeypatch, capsys, tmp_path, payload, key):
    write(tmp_path / "sweep" / "0" / "results.json", json.dumps(payload))
    monkeypatch.chdir(tmp_path)
    line = user_error_in_process(sweep.main, "flex-pbs-sweep", ["sweep"], capsys)
    assert str(Path("sweep") / "0" / "results.json") in line and key in line


@pytest.mark.slow  # a console script in a subprocess
def test_sweep_without_arguments_is_one_line(tmp_path):
    assert "the following arguments are required: multirun_dir" in user_error("flex-pbs-sweep", cwd=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing"], "missing is not a directory"),
        (["empty"], "no perplexity results.json under empty"),
        (["sweep", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_sweep_user_errors_are_one_line(monkeypatch, capsys, tmp_path, args, message):
    write(tmp_path / "sweep" / "0" / "results.json", json.dumps(results()))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert message in user_error_in_process(sweep.main, "flex-pbs-sweep", args, capsys)


# ----------------------------------------------------------------------- flex-pbs-calibrate


def measurements_file(path):
    records = measurement_records([LayerMeasurement(0, 0.5, 0.2, 0.01), LayerMeasurement(0, 1.0, 1.0, 0.0)])
    return write(path, json.dumps({"format": MEASUREMENTS_FORMAT, "model": "tiny", "measurements": records}))


def calibration_files(tmp_path):
    measurements_file(tmp_path / "m.json")
    write(tmp_path / "broken.json", (tmp_path / "m.json").read_text()[:50])
    (tmp_path / "outdir").mkdir()


@pytest.mark.slow  # a console script in a subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: --target-density, --out"),
        (["--target-density", "0.5", "--out", "t.json", "--reuse", "broken.json"], "broken.json is not valid JSON"),
    ],
)
def test_calibrate_user_errors_are_one_line(tmp_path, args, message):
    calibration_files(tmp_path)
    assert message in user_error("flex-pbs-calibrate", *args, cwd=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-density", "x", "--out", "t.json"], "argument --target-density: invalid float value: 'x'"),
        (["--target-density", "0.5", "--out", "t.json", "--reuse", "missing.json"], "missing.json does not exist"),
        (["--target-density", "0.01", "--out", "t.json", "--reuse", "m.json"], "below the sparsest"),
        (["--target-density", "0.5", "--out", "outdir", "--reuse", "m.json"], "--out outdir is a directory"),
        (["--target-density", "0.5", "--out", "t.json", "--device", "tpu"], "--device must be 'cpu' or 'cuda[:N]'"),
        (["--target-density", "1.5", "--out", "t.json", "--seq-len", "256", "--layers", "0", "--thresholds", "0.9"],
         "--target-density must be in (0, 1], got 1.5"),
        (["--target-density", "0.5", "--out", "t.json", "--thresholds", "1.5"], "--thresholds: threshold must be in (0, 1]"),
        (["--target-density", "0.5", "--out", "t.json", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
        (["--target-density", "0.5", "--out", "t.json", "--offset", "-1"], "--offset must be >= 0, got -1"),
        (["--target-density", "0.5", "--out", "t.json", "--layers", "-1"], "--layers must be >= 0, got -1"),
    ],
)
def test_calibrate_user_errors_are_one_line_before_any_model_runs(monkeypatch, capsys, tmp_path, args, message):
    calibration_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    loads = []
    monkeypatch.setattr(flex_pbs.runner.models, "load_smollm2", lambda *a, **k: loads.append(a))
    assert message in user_error_in_process(calibrate.main, "flex-pbs-calibrate", args, capsys)
    assert loads == [] and not (tmp_path / "t.json").exists() and not (tmp_path / "t.measurements.json").exists()
