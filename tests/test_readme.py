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
