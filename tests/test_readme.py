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


def test_readme_has_the_api_and_transformers_examples():
    assert len(python_blocks()) == 2


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
