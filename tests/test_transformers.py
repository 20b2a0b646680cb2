import pytest
import torch
from conftest import rel_error
from transformers import DynamicCache, LlamaForCausalLM

import flex_pbs
from flex_pbs import PBSConfig
from flex_pbs.runner.models import random_model, tiny_config

ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture
def registered():
    """Register flex_pbs for one test (threshold 1.0 unless the test re-registers)."""
    reg = flex_pbs.register(PBSConfig(segment_size=128, threshold=1.0), collect_stats=True, overwrite=True)
    yield reg
    flex_pbs.unregister()


def models(arch, **overrides):
    # A larger init gives peaked logits, so that greedy decoding is not a coin toss.
    cfg = tiny_config(arch, initializer_range=0.1, **overrides)
    return random_model(cfg, "sdpa"), random_model(cfg, "flex_pbs")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_threshold_one_prefill_logits_equal_sdpa(registered, arch):
    ref, pbs = models(arch)
    ids = torch.randint(0, 1024, (2, 768))
    with torch.no_grad():
        assert rel_error(pbs(ids).logits, ref(ids).logits) < 1e-4
    stats = flex_pbs.stats(pbs)
    assert set(stats) == {0, 1} and all(s.path == "pbs" and s.q_len == 768 for s in stats.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generate_matches_sdpa(registered, arch):
    ref, pbs = models(arch)
    ids = torch.randint(0, 1024, (1, 600))
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(pbs.generate(ids, **kwargs), ref.generate(ids, **kwargs))


@pytest.mark.parametrize("threshold", [1.0, 0.8])
def test_left_padded_batch_matches_each_prompt_alone(threshold):
    flex_pbs.register(PBSConfig(segment_size=128, threshold=threshold), overwrite=True)
    try:
        _, pbs = models("llama")
        long, short = torch.randint(1, 1024, (1, 700)), torch.randint(1, 1024, (1, 520))
        batch = torch.zeros(2, 700, dtype=torch.long)
        batch[0], batch[1, 180:] = long[0], short[0]
        mask = torch.ones(2, 700, dtype=torch.long)
        mask[1, :180] = 0
        kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            together = pbs.generate(batch, attention_mask=mask, **kwargs)[:, 700:]
            alone = [pbs.generate(x, **kwargs)[:, x.shape[1] :] for x in (long, short)]
            logits = pbs(batch, attention_mask=mask).logits
        assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])
        assert torch.isfinite(logits).all()  # padded rows too
    finally:
        flex_pbs.unregister()


def test_right_padding_keeps_padding_out(registered):
    ref, pbs = models("qwen2")
    ids = torch.randint(1, 1024, (2, 650))
    mask = torch.ones(2, 650, dtype=torch.long)
    mask[1, 500:] = 0
    with torch.no_grad():
        out = pbs(ids, attention_mask=mask).logits
        alone = pbs(ids[1:, :500]).logits
    assert torch.isfinite(out).all()
    assert rel_error(out[1, :500], alone[0]) < 1e-4


def test_mask_with_holes_falls_back_to_exact_attention(registered):
    ref, pbs = models("llama")
    ids = torch.randint(1, 1024, (1, 600))
    mask = torch.ones(1, 600, dtype=torch.long)
    mask[0, 300:310] = 0
    with torch.no_grad():
        assert rel_error(pbs(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) < 1e-4
    assert all(s.path == "exact" for s in flex_pbs.stats(pbs).values())


@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_chunked_prefill_with_a_cache(threshold):
    flex_pbs.register(PBSConfig(segment_size=128, threshold=threshold), collect_stats=True, overwrite=True)
    try:
        ref, pbs = models("llama")
        ids = torch.randint(0, 1024, (1, 1100))
        with torch.no_grad():
            one_shot = pbs(ids).logits
            cache = DynamicCache(config=pbs.config)
            first = pbs(ids[:, :600], past_key_values=cache).logits
            second = pbs(ids[:, 600:], past_key_values=cache).logits
            exact = ref(ids).logits
        chunked = torch.cat([first, second], dim=1)
        stats = flex_pbs.stats(pbs)
        # The second chunk's 500 queries were planned over the whole 1100-token cache.
        assert all(s.q_len == 500 and s.kv_len == 1100 and s.path == "pbs" for s in stats.values())
        if threshold == 1.0:
            assert rel_error(chunked, one_shot) < 1e-4 and rel_error(chunked, exact) < 1e-4
        else:
            assert torch.isfinite(chunked).all() and all(s.density.mean() < 1 for s in stats.values())
    finally:
        flex_pbs.unregister()


def test_sliding_window_models_run_exactly(registered):
    ref, pbs = models("mistral", sliding_window=128)
    ids = torch.randint(0, 1024, (1, 600))
    with torch.no_grad():
        assert rel_error(pbs(ids).logits, ref(ids).logits) < 1e-4
    assert all(s.path == "exact" for s in flex_pbs.stats(pbs).values())


def test_per_layer_control_and_stats():
    flex_pbs.register(
        PBSConfig(segment_size=128, threshold=0.5, force_local_blocks=0), dense_layers=1, layer_thresholds={1: 0.3},
        collect_stats=True, stats_recall=True, overwrite=True,
    )
    try:
        _, pbs = models("llama", num_hidden_layers=3)
        with torch.no_grad():
            pbs(torch.randint(0, 1024, (1, 1024)))
        stats = flex_pbs.stats(pbs)
        assert stats[0].path == "dense" and stats[0].density.eq(1).all()
        assert stats[1].path == stats[2].path == "pbs"
        assert stats[1].density.shape == (4,) and stats[1].recall.shape == (4,)
        assert stats[1].density.mean() < stats[2].density.mean() <= 1  # 0.3 < 0.5
        assert (stats[2].recall > 0).all() and (stats[2].recall <= 1 + 1e-6).all()
    finally:
        flex_pbs.unregister()


def test_registration_errors():
    flex_pbs.register(overwrite=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            flex_pbs.register()
        with pytest.raises(TypeError, match=r"unknown PBSConfig key\(s\) \['treshold'\]"):
            flex_pbs.register({"treshold": 0.9}, name="flex_pbs_typo")
        with pytest.raises(ValueError, match="built-in"):
            flex_pbs.register(name="sdpa")
        with pytest.raises(ValueError, match="threshold"):
            flex_pbs.register(layer_thresholds={3: 1.5}, overwrite=True)
    finally:
        flex_pbs.unregister()
    with pytest.raises(KeyError, match="not registered"):
        flex_pbs.unregister()


class NoBackendLlama(LlamaForCausalLM):
    """A model class that declares it does not dispatch through AttentionInterface."""

    _supports_attention_backend = False


def test_models_without_attention_interface_are_refused(registered):
    model = NoBackendLlama(tiny_config("llama"))
    with pytest.raises(TypeError, match="does not dispatch attention through"):
        flex_pbs.apply(model)
    ref, _ = models("llama")
    with pytest.raises(RuntimeError, match="no layer"):
        flex_pbs.stats(ref)  # an sdpa model never ran flex_pbs
    flex_pbs.apply(ref)
    assert ref.config._attn_implementation == "flex_pbs"


def test_decode_is_exact_with_padding(registered):
    ref, pbs = models("qwen3")
    ids = torch.randint(1, 1024, (2, 400))
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[0, :50] = 0
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    with torch.no_grad():
        assert torch.equal(pbs.generate(ids, **kwargs), ref.generate(ids, **kwargs))


# ------------------------------------------------------------- layer indices (dense, thresholds)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dense_layers": -1}, r"dense_layers=-1"), ({"dense_layers": [0, -2]}, r"dense_layers.*-2"),
     ({"dense_layers": [1.5]}, r"dense_layers.*1\.5"), ({"layer_thresholds": {-1: 0.5}}, r"layer_thresholds.*-1")],
)
def test_negative_layer_indices_are_refused_at_register(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flex_pbs.register(name="flex_pbs_bad_layers", **kwargs)
    with pytest.raises(KeyError):
        flex_pbs.registration("flex_pbs_bad_layers")  # nothing half-registered
    with pytest.raises(TypeError, match="dense_layers=None: pass an int n >= 0"):
        flex_pbs.register(name="flex_pbs_bad_layers", dense_layers=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dense_layers": [99]}, r"dense_layers \[99\]: the model has 2 layers \(0\.\.1\)"),
     ({"dense_layers": [1, 2, 7]}, r"dense_layers \[2, 7\]: the model has 2 layers \(0\.\.1\)"),
     ({"dense_layers": 5}, r"dense_layers=5: the model has 2 layers"),
     ({"layer_thresholds": {99: 0.5}}, r"layer_thresholds \[99\]: the model has 2 layers \(0\.\.1\)")],
)
def test_layer_indices_beyond_the_model_fail_at_apply_and_first_forward(kwargs, message):
    flex_pbs.register(PBSConfig(segment_size=128, threshold=1.0), overwrite=True, **kwargs)
    try:
        ref, pbs = models("llama")
        with pytest.raises(ValueError, match=message):
            flex_pbs.apply(ref)
        assert ref.config._attn_implementation == "sdpa"  # left as it was
        with pytest.raises(ValueError, match=message), torch.no_grad():
            pbs(torch.randint(0, 1024, (1, 300)))
    finally:
        flex_pbs.unregister()


def test_valid_layer_indices_keep_working():
    flex_pbs.register(PBSConfig(segment_size=128, threshold=1.0), dense_layers=2, layer_thresholds={1: 0.5}, collect_stats=True, overwrite=True)
    try:
        ref, pbs = models("llama")
        flex_pbs.apply(ref)  # 2 of 2 layers dense is fine
        with torch.no_grad():
            pbs(torch.randint(0, 1024, (1, 600)))
        assert all(s.path == "dense" for s in flex_pbs.stats(pbs).values())
    finally:
        flex_pbs.unregister()


# ----------------------------------------------------------------- static caches, custom 4D masks


STATIC = {"do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}


@pytest.fixture
def registered_no_local():
    """threshold 1.0 without forced local blocks, so that short prompts really run PBS."""
    reg = flex_pbs.register(PBSConfig(segment_size=128, threshold=1.0, force_local_blocks=0), collect_stats=True, overwrite=True)
    yield reg
    flex_pbs.unregister()


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 256})])
def test_static_cache_generate_matches_sdpa(registered_no_local, arch, overrides):
    ref, pbs = models(arch, **overrides)
    ids = torch.randint(1, 1024, (1, 600))
    with torch.no_grad():
        assert torch.equal(pbs.generate(ids, max_new_tokens=12, **STATIC), ref.generate(ids, max_new_tokens=12, **STATIC))
    # The prefill ran PBS on the prompt's 600 keys, not on the cache's empty slots (a sliding
    # window the prompt exceeds runs exactly).
    path = "exact" if overrides else "pbs"
    assert all(s.path == path and s.q_len == 600 for s in flex_pbs.stats(pbs).values())
    assert overrides or all(s.kv_len == 600 for s in flex_pbs.stats(pbs).values())


def test_static_cache_generate_with_left_padding_matches_sdpa(registered_no_local):
    ref, pbs = models("llama")
    ids = torch.randint(1, 1024, (2, 520))
    mask = torch.ones(2, 520, dtype=torch.long)
    mask[1, :130] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, **STATIC}
    with torch.no_grad():
        assert torch.equal(pbs.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_static_cache_generate_with_a_sparse_threshold():
    flex_pbs.register(PBSConfig(segment_size=128, threshold=0.5, force_local_blocks=0), collect_stats=True, overwrite=True)
    try:
        _, pbs = models("llama")
        ids = torch.randint(1, 1024, (1, 1024))
        with torch.no_grad():
            out = pbs.generate(ids, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **STATIC)
        assert out.sequences.shape == (1, 1030)
        assert all(torch.isfinite(step).all() for step in out.logits)
        stats = flex_pbs.stats(pbs)
        assert all(s.path == "pbs" and s.kv_len >= 1024 and s.density.mean() < 1 for s in stats.values())
    finally:
        flex_pbs.unregister()


def packed_mask(length: int, starts: list[int], fill: float | None) -> torch.Tensor:
    """``[1, 1, L, L]``: causal attention within each packed sequence; boolean (``fill`` None)
    or additive (0 where visible, ``fill`` elsewhere)."""
    segment = torch.zeros(length, dtype=torch.long)
    for start in starts:
        segment[start:] += 1
    pos = torch.arange(length)
    allowed = (pos[None] <= pos[:, None]) & (segment[None] == segment[:, None])
    if fill is None:
        return allowed[None, None]
    return torch.zeros(length, length).masked_fill(~allowed, fill)[None, None]


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min, None], ids=["-inf", "min", "bool"])
def test_custom_4d_masks_run_exactly_like_sdpa(registered, fill):
    ref, pbs = models("llama")
    ids = torch.randint(1, 1024, (2, 500))
    mask = packed_mask(500, [200, 330], fill).expand(2, 1, 500, 500)
    with torch.no_grad():
        out, expected = pbs(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert rel_error(out, expected) < 1e-5
    assert all(s.path == "exact" for s in flex_pbs.stats(pbs).values())


def test_integer_4d_masks_are_refused_with_a_hint(registered):
    _, pbs = models("llama")
    mask = packed_mask(100, [50], None).long()
    with pytest.raises(TypeError, match=r"boolean \(True = attend\) or additive float"), torch.no_grad():
        pbs(torch.randint(1, 1024, (1, 100)), attention_mask=mask)


def test_compiled_static_cache_generate_matches_sdpa(registered_no_local):
    """What generate() does on a GPU with a static cache: compile the decode step (here with
    dynamo's eager backend, which needs no compiler, and on every device)."""
    from transformers import CompileConfig

    ref, pbs = models("llama")
    ids = torch.randint(1, 1024, (1, 300))
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = pbs.generate(ids, max_new_tokens=6, compile_config=compile_config, **STATIC)
            expected = ref.generate(ids, max_new_tokens=6, **STATIC)
    finally:
        torch._dynamo.reset()
    assert hasattr(pbs, "_compiled_call")  # the decode steps ran compiled
    assert torch.equal(compiled, expected)


def training_step(model, ids, checkpointing=False):
    """One forward and backward in train mode: ``(loss, {parameter: gradient})``."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_at_threshold_one_has_the_gradients_of_sdpa(registered, arch, checkpointing):
    ref, pbs = models(arch)
    ids = torch.randint(0, 1024, (2, 700))  # past the 640 keys that run dense anyway
    ref_loss, ref_grads = training_step(ref, ids)
    loss, grads = training_step(pbs, ids, checkpointing)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        assert rel_error(grads[name], grad) < 1e-4, name  # fp32, summation order only


def test_training_at_a_sparse_threshold_lowers_the_loss():
    """Sparse attention in training: finite gradients, an optimizer step, the loss falls."""
    flex_pbs.register(PBSConfig(segment_size=128, threshold=0.5, force_local_blocks=0), collect_stats=True, overwrite=True)
    try:
        model = random_model(tiny_config("llama"), "flex_pbs", seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 1024, (2, 700), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss, grads = training_step(model, ids)
            assert all(torch.isfinite(g).all() for g in grads.values())
            optimizer.step()
            losses.append(loss)
        assert losses[-1] < losses[0] - 0.5 and all(b < a for a, b in zip(losses, losses[1:]))
        assert all(float(s.density.mean()) < 0.8 for s in flex_pbs.stats(model).values())
    finally:
        flex_pbs.unregister()


@pytest.mark.parametrize("permute, share", [("key", 1.0), ("none", 0.0)])
def test_stats_record_the_share_of_kv_heads_whose_keys_were_permuted(permute, share):
    flex_pbs.register(PBSConfig(permute=permute, segment_size=256), collect_stats=True, overwrite=True)
    try:
        _, pbs = models("llama")
        with torch.no_grad():
            pbs(torch.randint(0, 1024, (1, 1100)))
        stats = flex_pbs.stats(pbs)
        kv_heads = pbs.config.num_key_value_heads
        assert all(s.permuted.shape == (kv_heads,) and s.permuted.tolist() == [share] * kv_heads for s in stats.values())
    finally:
        flex_pbs.unregister()
