import pytest
import torch

from flex_pbs.integrations.capture import capture_qkv
from flex_pbs.runner.models import random_model, tiny_config


def test_capture_returns_post_rope_qkv_and_restores_the_model():
    model = random_model(tiny_config("llama", num_hidden_layers=3), "sdpa")
    ids = torch.randint(0, 1024, (1, 300))
    with torch.no_grad():
        before = model(ids).logits
    qkv = capture_qkv(model, ids, layers=[0, 2])
    assert set(qkv) == {0, 2}
    q, k, v = qkv[2]
    assert q.shape == (1, 4, 300, 64) and k.shape == v.shape == (1, 2, 300, 64)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # Layer 0's attention recomputed from its captured inputs is what the layer computed: SDPA
    # with GQA on the captured Q/K/V equals the input of the layer's output projection.
    seen = {}
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    q0, k0, v0 = qkv[0]
    out = torch.nn.functional.scaled_dot_product_attention(q0, k0, v0, is_causal=True, enable_gqa=True)
    assert torch.allclose(out.transpose(1, 2).reshape(1, 300, -1), seen["x"], rtol=1e-5, atol=1e-6)


def test_capture_rejects_unknown_layers():
    model = random_model(tiny_config("qwen2"), "sdpa")
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        capture_qkv(model, torch.randint(0, 1024, (1, 50)), layers=[7])
