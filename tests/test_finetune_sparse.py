"""benchmarks/finetune_sparse.py runs end to end (on a tiny random model, a few steps)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import finetune_sparse  # noqa: E402


def test_finetune_reports_the_gap_at_each_evaluation(tmp_path):
    out = tmp_path / "finetune.json"
    report = finetune_sparse.main(["--model", "tiny", "--steps", "4", "--eval-every", "2", "--seq-len", "1024",
                                   "--lr", "1e-3", "--train-offset", "2048", "--out", str(out)])
    rows = report["rows"]
    assert [row["step"] for row in rows] == [0, 2, 4] and out.exists()
    for row in rows:
        assert row["gap_pct"] == 100 * (row["sparse_ppl"] / row["dense_ppl"] - 1)
        assert 0 < row["density"] < 1
    assert rows[-1]["train_loss"] is not None and rows[-1]["dense_ppl"] < rows[0]["dense_ppl"]  # it trained
