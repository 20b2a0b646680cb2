"""flex_pbs under transformers' tensor parallelism, on CPU with the gloo backend: several
processes started by ``torch.distributed.run`` from the test, each holding a share of the heads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from flex_pbs.integrations.tensor_parallel import (
    check_heads,
    gather_heads,
    model_heads,
    valid_sizes,
)
from flex_pbs.runner.checks import ConfigError
from flex_pbs.runner.models import SMOLLM2_HEADS, llama_8b_config, tiny_config
from flex_pbs.runner.schema import validate

TESTS = Path(__file__).parent
REPO = TESTS.parent


def distributed(processes: int, *args: str, timeout: int, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_heads_split_only_into_whole_gqa_groups():
    assert valid_sizes(*SMOLLM2_HEADS) == [1, 3]
    assert valid_sizes(*model_heads(tiny_config("llama"))) == [1, 2]
    assert valid_sizes(*model_heads(llama_8b_config())) == [1, 2, 4, 8]
    check_heads(32, 8, 4)
    with pytest.raises(ValueError, match=r"over 2 ranks would split 9 query / 3 key-value heads .* valid sizes: \[1, 3\]"):
        check_heads(9, 3, 2)


def test_without_tensor_parallelism_stats_are_this_process_heads():
    values = torch.tensor([0.5, 0.25])
    assert gather_heads(values, torch.nn.Linear(2, 2)) is values


def run_config(*overrides):
    with initialize_config_module(config_module="flex_pbs.configs", version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides, launched, message", [
    (["tp=2"], None, r"tp=2 shards the model over 2 processes: start them with torchrun --nproc-per-node 2"),
    (["tp=4", "model=tiny_llama"], "2", r"tp=4 but torchrun started 2 processes"),
    (["tp=2"], "2", r"tp=2: model smollm2 has 9 query / 3 key-value heads, .* valid tp: \[1, 3\]"),
    (["tp=3", "model=tiny_llama"], "3", r"valid tp: \[1, 2\]"),
    (["tp=2", "model=tiny_llama", "task=attention_stats"], "2", r"task=attention_stats runs in one process"),
    (["tp=0"], None, r"tp must be > 0, got 0"),
])
def test_a_wrong_tp_fails_before_any_model_loads(monkeypatch, overrides, launched, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if launched:
        monkeypatch.setenv("WORLD_SIZE", launched)
    with pytest.raises(ConfigError, match=message):
        validate(run_config(*overrides))


def tensor_parallel_report(tmp_path, processes, *args, timeout):
    out = tmp_path / "report.json"
    done = distributed(processes, str(TESTS / "tensor_parallel_worker.py"), args[0], str(out), *args[1:],
                       timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def check_report(report, size, tolerance):
    """Every comparison of the worker: tensor-parallel flex_pbs against one process."""
    assert report["tp_size"] == report["world_size"] == size
    assert report["exact_vs_sdpa"] < tolerance  # threshold 1.0 equals one-process SDPA
    for key in ("sparse_vs_single", "layers_vs_single", "padded_vs_single", "chunked_vs_single"):
        assert report[key] < tolerance, key
    assert report["stats_sharded"] == report["stats_single"]  # every layer, every head
    assert report["layers_stats_sharded"] == report["layers_stats_single"]
    assert min(min(density) for density, _ in report["stats_sharded"].values()) < 1  # really sparse
    assert set(report["layers_stats_sharded"]["0"][0]) == {1.0}  # dense_layers=[0]
    assert report["generated_sharded"] == report["generated_single"] and len(report["generated_single"]) == 20


@pytest.mark.slow
def test_tiny_llama_over_two_ranks_equals_one_process(tmp_path):
    """4 query / 2 KV heads, 2 ranks: logits at threshold 1.0 equal SDPA, at 0.9 equal one-process
    flex_pbs (fp32: relative error under 1e-5, summation order only); stats and 20 generated
    tokens equal; padding, chunked prefill, per-layer thresholds and dense layers too."""
    report = tensor_parallel_report(tmp_path, 2, "tiny", str(tmp_path / "checkpoint"), timeout=600)
    check_report(report, 2, 1e-5)
    assert {len(density) for density, _ in report["stats_sharded"].values()} == {4}  # all heads, not a rank's 2
    assert {len(permuted) for _, permuted in report["stats_sharded"].values()} == {2}  # every KV head


@pytest.mark.slow
def test_bundled_smollm2_over_three_ranks_equals_one_process(tmp_path):
    """SmolLM2's 9 query / 3 KV heads over 3 ranks, the same checks."""
    report = tensor_parallel_report(tmp_path, 3, "smollm2", timeout=900)
    check_report(report, 3, 1e-5)
    assert {len(density) for density, _ in report["stats_sharded"].values()} == {9}  # all heads, not a rank's 3
    assert {len(permuted) for _, permuted in report["stats_sharded"].values()} == {3}  # every KV head


@pytest.mark.slow
def test_runner_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    args = ["model=tiny_llama", "seq_len=640", "task.tail_tokens=256", "task.passkey_trials=0",
            "method.threshold=0.5", "method.force_local_blocks=0"]
    done = distributed(2, "-m", "flex_pbs.runner.cli", "tp=2", *args, f"hydra.run.dir={tmp_path / 'tp'}",
                       timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("| method | context | perplexity") == 1  # rank 0 reports, once
    assert sorted(p.name for p in (tmp_path / "tp").glob("results.*")) == ["results.csv", "results.json", "results.png"]
    single = subprocess.run([str(Path(sys.executable).parent / "flex-pbs-run"), *args, f"hydra.run.dir={tmp_path / 'one'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    rows = [json.loads((tmp_path / run / "results.json").read_text())["rows"] for run in ("tp", "one")]
    for sharded, one in zip(*rows):
        assert sharded["method"] == one["method"] and sharded["density"] == one["density"]
        assert sharded["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert rows[0][1]["density"] < 1
    latency = distributed(2, "-m", "flex_pbs.runner.cli", "tp=2", "model=tiny_llama", "seq_len=640", "task=latency",
                          "task.repeats=1", f"hydra.run.dir={tmp_path / 'latency'}", timeout=600, cwd=tmp_path)
    assert latency.returncode == 0, latency.stderr[-4000:]
    rows = json.loads((tmp_path / "latency" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "pbs"] and all(row["prefill_s"] > 0 for row in rows)
