"""task=continuation, the sparse-prefill-then-exact-decode path as deployed, on a tiny random
model: its dense row is one forward pass's last losses, threshold 1.0 is dense, a really sparse
prefill changes the continuation, the KV cache is really extended, bad values fail early."""

import json
import math

import pytest
import torch
from test_runner import PNG_MAGIC, SPARSE, composed, rows_by_method, run

import flex_pbs.runner.models
from flex_pbs.runner import session
from flex_pbs.runner.checks import ConfigError
from flex_pbs.runner.measure import sparse_prefill_then_exact, token_losses
from flex_pbs.runner.schema import validate
from flex_pbs.runner.session import evaluation_ids, load_session

CONTINUATION_TOKENS = 128
# 768 prefill tokens: three segments of 256 keys, enough for PBS to skip blocks.
CONTINUATION = ["model=tiny_llama", "seq_len=896", "task=continuation", f"task.continuation_tokens={CONTINUATION_TOKENS}"]
# float32 end to end: the cached continuation computes the same attention in another split
# (its queries over cached keys rather than one causal pass), which can move a mean NLL by
# float32 rounding, ~1e-7 relative; 1e-5 leaves room for that and stays well below what a
# sparse prefill does to this random model (density 0.64 moves its NLL by ~3e-4 relative).
FLOAT32_REL = 1e-5


def test_continuation_task(tmp_path):
    payload = run([*CONTINUATION, *SPARSE], tmp_path)
    dense, pbs = payload["rows"]
    assert (dense["method"], pbs["method"]) == ("dense", "pbs")
    for row in (dense, pbs):
        assert (row["prefill_tokens"], row["continuation_tokens"]) == (896 - CONTINUATION_TOKENS, CONTINUATION_TOKENS)
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"]))
        assert row["delta_nll"] == pytest.approx(row["nll"] - dense["nll"])
    assert dense["density"] == 1.0 and dense["recall"] == 1.0 and dense["delta_pct"] == 0
    assert 0 < pbs["density"] < 1 and 0 < pbs["recall"] < 1
    assert payload["details"]["pbs"]["stats"]["paths"] == {"pbs": 2} and payload["details"]["dense"]["stats"] is None
    assert any("exact attention (SDPA) over that cache" in note for note in payload["notes"])
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_dense_continuation_equals_the_last_losses_of_one_forward_pass(tmp_path):
    row = run([*CONTINUATION, "method=dense"], tmp_path)["rows"][0]
    spec = validate(composed([*CONTINUATION, "method=dense"]))
    model_session = load_session(spec)
    ids = evaluation_ids(spec, model_session)
    with torch.no_grad():
        logits = model_session.model(ids, use_cache=False).logits
    losses = token_losses(logits, ids)[-CONTINUATION_TOKENS:]
    assert row["nll"] == pytest.approx(float(losses.double().mean()), rel=FLOAT32_REL)


def test_threshold_one_continuation_equals_dense(tmp_path):
    rows = rows_by_method(run([*CONTINUATION, "task.recall=false", "method.threshold=1.0"], tmp_path))
    assert rows["pbs"]["density"] == 1.0
    assert rows["pbs"]["nll"] == pytest.approx(rows["dense"]["nll"], rel=FLOAT32_REL)


def test_a_sparse_prefill_changes_the_continuation(tmp_path):
    rows = rows_by_method(run([*CONTINUATION, "task.recall=false", *SPARSE], tmp_path))
    assert rows["pbs"]["density"] < 1
    assert rows["pbs"]["nll"] != pytest.approx(rows["dense"]["nll"], rel=FLOAT32_REL)


class CacheDropping:
    """A model that fills an empty KV cache (the prefill) but runs without a filled one (a
    continuation that forgets the prefill)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, ids, cache=None, **kwargs):
        if cache.get_seq_length() == 0:
            kwargs["cache"] = cache
        return self.model(ids, **kwargs)

    __call__ = forward


def test_a_continuation_that_ignores_the_cache_is_refused():
    spec = validate(composed([*CONTINUATION, "method=dense"]))
    loaded = load_session(spec)
    forgetful = session.Session(CacheDropping(loaded.model), loaded.tokenizer, loaded.random_weights, loaded.device)
    ids = evaluation_ids(spec, loaded)
    with pytest.raises(RuntimeError, match=r"did not extend the prefill's KV cache: .* cache of 768 positions, expected 896"):
        sparse_prefill_then_exact(forgetful, None, ids[:, :768], ids[:, 768:])


@pytest.mark.parametrize("ids_shape, message", [((1, 0), r"prefix must be \[1, n\]"), ((2, 4), r"prefix must be \[1, n\]")])
def test_prefill_then_exact_refuses_malformed_ids(ids_shape, message):
    with pytest.raises(ValueError, match=message):
        sparse_prefill_then_exact(None, None, torch.zeros(ids_shape, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.continuation_tokens=0"], r"task.continuation_tokens must be > 0, got 0"),
        (["task.continuation_tokens=896"], r"task.continuation_tokens \(896\) must be below seq_len \(896\): the prefill"),
        (["seq_len=100", "task.continuation_tokens=128"], r"task.continuation_tokens \(128\) must be below seq_len \(100\)"),
    ],
)
def test_bad_continuation_config_fails_before_any_model_loads(monkeypatch, tmp_path, overrides, message):
    loads = []
    monkeypatch.setattr(flex_pbs.runner.models, "random_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(session, "_LOADED", {})
    with pytest.raises(ConfigError, match=message):
        run([*CONTINUATION, *overrides], tmp_path)
    assert loads == [] and not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_continuation_under_torchrun_equals_one_process(tmp_path):
    from test_tensor_parallel import distributed

    args = [*CONTINUATION, *SPARSE]
    done = distributed(2, "-m", "flex_pbs.runner.cli", "tp=2", *args, f"hydra.run.dir={tmp_path / 'tp'}",
                       timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = json.loads((tmp_path / "tp" / "results.json").read_text())["rows"]
    one = run(args, tmp_path / "one")["rows"]
    for tp_row, row in zip(sharded, one, strict=True):
        assert tp_row["density"] == row["density"] and tp_row["recall"] == pytest.approx(row["recall"], rel=1e-6)
        assert tp_row["nll"] == pytest.approx(row["nll"], rel=FLOAT32_REL)
    assert sharded[1]["density"] < 1
