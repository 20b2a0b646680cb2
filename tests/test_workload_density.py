"""benchmarks/workload_density.py runs end to end at a small length."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import workload_density

METHODS = ["pbs", "xattention", "pbs_antidiagonal:scoring=oracle"]


@pytest.fixture
def captured_file(tmp_path):
    """A stand-in for the captured file (random Q/K/V, 1 layer, 2/1 heads, D=32)."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "captured.pt"
    torch.save({"q": torch.randn(1, 2, 1024, 32, generator=gen), "k": torch.randn(1, 1, 1024, 32, generator=gen),
                "v": torch.randn(1, 1, 1024, 32, generator=gen)}, path)
    return path


def test_every_family_and_method_gets_a_row_with_density_and_recall(tmp_path, captured_file, capsys):
    out = tmp_path / "density.json"
    report = workload_density.main(["--lengths", "1024", "--methods", *METHODS, "--captured", str(captured_file),
                                    "--recall-blocks", "4", "--out", str(out)])
    rows = report["rows"]
    families = ["a_shape", "vertical_slash", "scattered", "captured"]
    assert [(row["family"], row["method"]) for row in rows] == [(f, m) for f in families for m in METHODS]
    assert json.loads(out.read_text())["rows"] == rows
    for row in rows:
        assert 0 < row["density"] <= 1 and 0 <= row["recall_min_head"] <= row["recall"] <= 1 + 1e-6, row
    # Exact block masses keep at least 90% of every sampled query block's mass (float32 sums:
    # 1e-4 of slack), whatever the workload.
    assert all(row["recall"] >= 0.9 - 1e-4 for row in rows if "oracle" in row["method"])
    # captured runs at the file's shape, the synthetic families at the command line's.
    shapes = {row["family"]: row["shape"] for row in rows}
    assert shapes["captured"] == "1x2/1x32" and shapes["a_shape"] == "1x4/2x64"
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index("| " + " | ".join(workload_density.COLUMNS) + " |") :]
    assert len(table) == 2 + len(rows)  # header, separator, one line per row


def test_default_methods_parse_at_the_threshold():
    configs = {m: workload_density.method_at(m, 0.8) for m in workload_density.DEFAULT_METHODS}
    assert all(cfg.threshold == 0.8 and cfg.max_density is None for cfg in configs.values())
    assert configs["pbs_antidiagonal:scoring=oracle"].scoring == "oracle"
    assert configs["pbs_antidiagonal:scoring=oracle"].permute == "key"
    with pytest.raises(SystemExit, match="'dense' computes every block"):
        workload_density.method_at("dense", 0.9)
    with pytest.raises(SystemExit, match="pbs:bogus=1: unknown PBSConfig key"):
        workload_density.method_at("pbs:bogus=1", 0.9)


def test_missing_captured_file_says_how_to_create_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        workload_density.main(["--lengths", "1024", "--captured", str(tmp_path / "none.pt")])
    assert "pass --capture to create it" in capsys.readouterr().err
