"""The bundled real model (SmolLM2-135M-Instruct, offline): the promises the README makes."""

import pytest
import torch

import flex_pbs
from flex_pbs import PBSConfig
from flex_pbs.runner.data import token_ids
from flex_pbs.runner.models import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_default_config_loss_within_two_percent_of_sdpa_at_2k(smollm2):
    model, tokenizer = smollm2
    ids = token_ids(tokenizer, "code", 2048)
    flex_pbs.register(PBSConfig(), collect_stats=True, overwrite=True)
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            dense = model(ids, labels=ids).loss.item()
            model.set_attn_implementation("flex_pbs")
            sparse = model(ids, labels=ids).loss.item()
        stats = flex_pbs.stats(model)
    finally:
        model.set_attn_implementation("sdpa")
        flex_pbs.unregister()
    density = sum(float(s.density.mean()) for s in stats.values()) / len(stats)
    assert len(stats) == 30 and all(s.path == "pbs" for s in stats.values())
    assert abs(sparse - dense) / dense < 0.02, (dense, sparse)
    assert density < 1, density
