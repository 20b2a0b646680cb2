"""Correctness checks on a CUDA machine without pytest (the lent GPU has none).

Every named method x {fp32, bf16, fp16} x head_dim {64, 128} x a length that is a multiple of
128 and one that is not: the output is finite, at threshold 1.0 it equals SDPA within SDPA's
own error, and at the method's threshold it equals exact attention restricted to the plan's
computed blocks (``plan.token_mask()``: what the kernel must compute, permuted or not). Also:
exact mode for shapes the fused kernels cannot tile, fused planning against the plain-torch
stages, no host-device synchronisation in the attention path; and gradients (FlexAttention's
backward) against exact attention restricted to the plan, fp32 and bf16, permuted and not,
with GQA, and a tiny model trained through ``attn_implementation="flex_pbs"``. Prints one line
per check, writes JSON, exits non-zero if a check fails.

    python benchmarks/cuda_smoke.py [--out cuda_smoke.json] [--only matrix|head_dims|other|grad] [--methods pbs ...] [--dtypes bfloat16 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flex_pbs import PBSConfig, build_plan, pbs_attention  # noqa: E402
from flex_pbs.analysis.synthetic import planted_qkv  # noqa: E402
from flex_pbs.engine.methods import METHODS  # noqa: E402

# Where the checks run. The script needs CUDA; tests/test_cuda_smoke.py runs some checks on the
# CPU so that a check that no longer fits the engine fails in CI, not on a lent GPU.
DEVICE = torch.device("cuda")

# Error allowed beyond twice SDPA's own (against a float64 reference), about a unit roundoff
# of the dtype: reductions in a different order may differ by that much, a wrong key not.
ERROR_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def exact_vs_sdpa(head_dim: int, length: int, backend: str, block_size: int = 128, key_block_size: int | None = None) -> dict:
    """threshold 1.0 (every causal block) against SDPA, both bf16, against an fp32 reference."""
    q, k, v = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=head_dim, seed=0)
    q, k, v = (t.to(DEVICE).bfloat16() for t in (q, k, v))
    config = PBSConfig(threshold=1.0, backend=backend, block_size=block_size, key_block_size=key_block_size)
    out = pbs_attention(q, k, v, config)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    err, sdpa_err = rel_error(out, ref), rel_error(sdpa, ref)
    return {"check": f"exact d={head_dim} L={length} backend={backend} block={block_size} key block={key_block_size}", "rel_error": err,
            "sdpa_rel_error": sdpa_err, "ok": err < 2 * sdpa_err + 1e-3}


def matches(out: torch.Tensor, q, k, v, mask: torch.Tensor | None) -> dict:
    """``out`` against float64 SDPA with ``mask`` (causal if None), within twice the error of
    SDPA run in ``out``'s dtype, plus :data:`ERROR_FLOOR`."""
    kwargs = {"attn_mask": mask} if mask is not None else {"is_causal": True}
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kwargs)
    own = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    err, sdpa_err = rel_error(out, ref), rel_error(own, ref)
    return {"rel_error": err, "sdpa_rel_error": sdpa_err, "ok": err <= 2 * sdpa_err + ERROR_FLOOR[q.dtype]}


def method_matrix(method: str, dtype: torch.dtype, head_dim: int, length: int, **overrides: object) -> dict:
    """One named method on one dtype, head dim and length: finite; exact at threshold 1.0;
    equal to exact attention restricted to its plan at its own threshold."""
    q, k, v = planted_qkv(batch=2, q_heads=8, kv_heads=2, seq_len=length, head_dim=head_dim, seed=6,
                          dtype=dtype, device=DEVICE)
    cfg = METHODS[method].replace(**overrides)
    out, plan = pbs_attention(q, k, v, cfg, return_plan=True)
    exact = matches(pbs_attention(q, k, v, cfg.replace(threshold=1.0)), q, k, v, None)
    restricted = matches(out, q, k, v, plan.token_mask())
    nonfinite_rows = (~torch.isfinite(out).all(-1)).nonzero()[:, 2].unique()
    return {"check": f"{method} {str(dtype)[6:]} d={head_dim} L={length} {overrides or ''}", "density": plan.density,
            "nonfinite_rows": nonfinite_rows[:8].tolist(), "exact": exact, "plan_restricted": restricted,
            "ok": len(nonfinite_rows) == 0 and exact["ok"] and restricted["ok"]}


def guard_diagnosis(length: int = 4096) -> dict:
    """Why permuted methods returned NaN (bf16, head_dim 128, Hopper's tuned tiles): without
    FlexAttention's guard for rows that have seen no key yet (``keys_in_order=True`` forces
    ``ROWS_GUARANTEED_SAFE``), exactly the rows whose first visited tile holds no visible key
    are NaN. The library's own call keeps the guard and is finite."""
    from flex_pbs.engine.attend import flex_attend
    from flex_pbs.engine.permute import permute_keys

    q, k, v = planted_qkv(batch=1, q_heads=32, kv_heads=8, seq_len=length, head_dim=128, seed=0,
                          dtype=torch.bfloat16, device=DEVICE)
    out, plan = pbs_attention(q, k, v, METHODS["pbs_antidiagonal"], return_plan=True)
    k_perm, v_perm = permute_keys(k, plan.key_order), permute_keys(v, plan.key_order)
    unguarded = flex_attend(q, k_perm, v_perm, plan.flex_mask, 128**-0.5, keys_in_order=True)
    nan_rows = ~torch.isfinite(unguarded).all(-1)
    layout = plan.layout
    first_block = plan.flex_mask.kv_indices[:, :, : layout.num_q_blocks, 0].long()
    order = plan.key_order.repeat_interleave(4, dim=1)
    slots = first_block[..., None] * layout.kv_block + torch.arange(layout.kv_block, device=DEVICE)
    first_key = order.gather(-1, slots.flatten(2)).view(slots.shape).amin(-1)
    unsafe = first_key.repeat_interleave(layout.block_size, dim=2) > torch.arange(length, device=DEVICE)
    return {"check": f"guard diagnosis pbs_antidiagonal bf16 L={length}", "nan_rows_unguarded": int(nan_rows.sum()),
            "first_tile_unsafe_rows": int(unsafe.sum()), "same_rows": bool(torch.equal(nan_rows, unsafe)),
            "first_nan_rows": nan_rows[0, 0].nonzero().flatten()[:6].tolist(),
            "ok": bool(torch.isfinite(out).all())}


def chunked_exact(length: int, q_len: int) -> dict:
    """threshold 1.0 with the queries at the end of the keys (chunked prefill), ragged lengths."""
    q, k, v = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=128, seed=2)
    q, k, v = (t.to(DEVICE).bfloat16() for t in (q, k, v))
    q = q[:, :, -q_len:]
    out = pbs_attention(q, k, v, PBSConfig(threshold=1.0), q_offset=length - q_len)
    visible = torch.arange(length, device=DEVICE)[None, :] <= torch.arange(length - q_len, length, device=DEVICE)[:, None]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    err, sdpa_err = rel_error(out, ref), rel_error(sdpa, ref)
    return {"check": f"exact chunked L={length} q_len={q_len}", "rel_error": err, "sdpa_rel_error": sdpa_err,
            "ok": err < 2 * sdpa_err + 1e-3}


def fp8_scoring(length: int, peak_weight: float = 0.0) -> dict:
    """The fp8 cast kernels equal torch's casts (per tensor for K, per stride slot for Q); fp8
    block scores select nearly the bf16 blocks (also with a peak estimate mixed in)."""
    from flex_pbs.engine.kernels.antidiagonal import _abs_max, _to_fp8, _to_fp8_slots

    q, k, _ = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=128, seed=3)
    q, k = q.to(DEVICE).bfloat16(), k.to(DEVICE).bfloat16()
    amax = _abs_max(k).reshape(1)
    cast_equal = torch.equal(_to_fp8(k, amax).view(torch.uint8),
                             (k.float() * (240.0 / amax)).to(torch.float8_e4m3fn).view(torch.uint8))
    stride = 8
    slots = q.float().reshape(1, 8, length // stride, stride * 128)
    slot_max = slots.abs().amax(-1, keepdim=True)
    q8, descale = _to_fp8_slots(q, stride)
    reference = (slots * (240.0 / slot_max)).to(torch.float8_e4m3fn).view(torch.uint8).reshape(q8.shape)
    # Triton's fp32 division is approximate (within 2 ulp): a product on an fp8 rounding
    # boundary may round the other way, so a few codes may differ by one step.
    slot_cast_mismatch = float((q8.view(torch.uint8) != reference).float().mean())
    descale_ok = torch.allclose(descale, slot_max.squeeze(-1) / 240.0, rtol=1e-6, atol=0)
    cfg = PBSConfig(threshold=0.9, peak_weight=peak_weight)
    bf16, fp8 = build_plan(q, k, cfg), build_plan(q, k, cfg.replace(scoring_fp8=True))
    differ = float((bf16.block_mask != fp8.block_mask).float().mean())
    return {"check": f"fp8 scoring L={length} peak_weight={peak_weight}", "cast_equal": cast_equal, "slot_cast_mismatch": slot_cast_mismatch,
            "slot_descale_ok": descale_ok, "blocks_differ": differ, "density": [bf16.density, fp8.density],
            "ok": cast_equal and slot_cast_mismatch < 1e-4 and descale_ok and differ < 0.05}


def shared_index_buffer(length: int, **config: object) -> dict:
    """Attention from the fused selection's index lists (overlapping views of one buffer,
    narrower than the key blocks under a ``max_density`` budget) equals attention from
    separate torch lists of the same selection."""
    from flex_pbs.engine.attend import flex_attend
    from flex_pbs.engine.mask import build_stage, selection_indices
    from flex_pbs.engine.permute import permute_keys

    q, k, v = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=128, seed=4)
    q, k, v = (t.to(DEVICE).bfloat16() for t in (q, k, v))
    cfg = PBSConfig(threshold=0.9, **config)
    plan = build_plan(q, k, cfg)
    permuted = cfg.permute != "none"
    k, v = (permute_keys(t, plan.key_order) if permuted else t for t in (k, v))
    lists = selection_indices(plan.block_mask, plan.layout.diagonal_blocks(q.device))
    reference = flex_attend(q, k, v, build_stage(lists, plan.key_order, plan.layout, permuted=permuted), 128**-0.5)
    out = flex_attend(q, k, v, plan.flex_mask, 128**-0.5)
    diff = float((out.float() - reference.float()).abs().max())
    width = plan.flex_mask.full_kv_indices.shape[-1]
    return {"check": f"shared index buffer L={length} {config}", "max_abs_diff": diff, "list_width": width,
            "key_blocks": plan.layout.num_kv_blocks, "shared": not plan.flex_mask.kv_indices.is_contiguous(),
            "ok": diff == 0.0}


def fused_vs_torch_plan(length: int, **config: object) -> dict:
    q, k, _ = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=128, seed=1)
    q, k = q.to(DEVICE).bfloat16(), k.to(DEVICE).bfloat16()
    cfg = PBSConfig(threshold=0.9, **config)
    fused, plain = build_plan(q, k, cfg.replace(backend="triton")), build_plan(q, k, cfg.replace(backend="torch"))
    differ = float((fused.block_mask != plain.block_mask).float().mean())
    return {"check": f"fused vs torch plan L={length} {config}", "blocks_differ": differ,
            "density": [fused.density, plain.density], "ok": differ < 0.01}


def fused_scores_vs_torch(dtype: torch.dtype, peak_weight: float = 0.0, block_size: int = 128) -> dict:
    """The fused scorer against the plain-torch one (fp32 arithmetic) on permuted keys, chunked
    prefill and lengths that are not a multiple of the stride (zero-padded rows)."""
    from flex_pbs.engine.kernels.antidiagonal import antidiagonal_block_scores_fused
    from flex_pbs.engine.layout import BlockLayout
    from flex_pbs.engine.permute import key_importance, permute_keys, segment_key_order
    from flex_pbs.engine.score import antidiagonal_block_scores

    q, k, _ = planted_qkv(batch=2, q_heads=8, kv_heads=2, seq_len=9003, head_dim=128, seed=5)
    q, k = q[:, :, -5001:].to(DEVICE).to(dtype), k.to(DEVICE).to(dtype)
    offset = k.shape[2] - q.shape[2]
    order = segment_key_order(key_importance(q.float(), k.float(), block_size, 128**-0.5, offset), 2 * block_size)
    k_perm = permute_keys(k, order)
    layout = BlockLayout(q_len=q.shape[2], kv_len=k.shape[2], q_offset=offset, block_size=block_size, kv_block=block_size,
                         segment_size=2 * block_size)
    ref = antidiagonal_block_scores(q.float(), k_perm.float(), order, layout, 8, 128**-0.5, peak_weight=peak_weight)
    out = antidiagonal_block_scores_fused(q.transpose(1, 2).contiguous().transpose(1, 2), k_perm, order, layout, 8,
                                          128**-0.5, peak_weight=peak_weight)
    err = float((out - ref).abs().max())
    return {"check": f"fused scores vs torch {dtype} peak_weight={peak_weight} block={block_size}", "max_abs_diff": err, "ok": err < (1e-3 if dtype == torch.float32 else 2e-2)}


def no_host_sync(length: int = 8192) -> dict:
    """Planning and attending never make the host wait for the GPU (a wait per layer leaves the
    GPU idle while the next kernels are launched): the default config, fp8 scoring, permuted
    keys and chunked prefill, directly and through the transformers adapter with stats on, run
    under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up call."""
    import flex_pbs
    from flex_pbs.integrations.transformers import registration

    q, k, v = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq_len=length, head_dim=128, seed=2)
    q, k, v = (t.to(DEVICE).bfloat16() for t in (q, k, v))
    layer = torch.nn.Module()
    layer.layer_idx, layer.is_causal = 0, True
    flex_pbs.register(PBSConfig(), collect_stats=True, overwrite=True)
    calls = {
        "default": lambda: pbs_attention(q, k, v),
        "fp8": lambda: pbs_attention(q, k, v, PBSConfig(scoring_fp8=True)),
        "permuted": lambda: pbs_attention(q, k, v, PBSConfig(permute="key", segment_size=256)),
        "chunked": lambda: pbs_attention(q[:, :, -3000:], k, v, q_offset=length - 3000),
        "adapter with stats": lambda: registration()(layer, q, k, v, None, 128**-0.5),
    }
    syncing = []
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        except RuntimeError as error:
            syncing.append(f"{name}: {str(error)[:200]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    density = float(flex_pbs.stats(layer)[0].density.mean()) if not syncing else None
    flex_pbs.unregister()
    return {"check": "no host sync", "syncing": syncing, "adapter density": density, "ok": not syncing}


def gradients(method: str, dtype: torch.dtype, head_dim: int, length: int, q_len: int | None = None,
              **overrides: object) -> dict:
    """Differentiable on CUDA: the gradients of a weighted sum of the output with respect to q,
    k and v (and the output) equal those of exact attention restricted to the plan
    (``plan.token_mask()``) in float64, within twice the error of the same SDPA reference run in
    the input dtype plus :data:`ERROR_FLOOR`; finite; and the no-grad forward meets the same bound."""
    q, k, v = planted_qkv(batch=2, q_heads=8, kv_heads=2, seq_len=length, head_dim=head_dim, seed=7,
                          dtype=dtype, device=DEVICE)
    q = q[:, :, length - (q_len or length):]
    offset = length - q.shape[2]
    cfg = METHODS[method].replace(**overrides)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, plan = pbs_attention(*inputs, cfg, q_offset=offset, return_plan=True)
    weights = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    (out.float() * weights).sum().backward()
    mask = plan.token_mask()

    def reference(ref_dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        ref_out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
        (ref_out.to(weights.dtype) * weights.to(ref_dtype)).sum().backward()
        return [ref_out.detach()] + [t.grad for t in leaves]

    exact, own = reference(torch.float64), reference(dtype)
    errors = {}
    for name, got, want, sdpa_own in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in inputs], exact, own):
        err, sdpa_err = rel_error(got, want), rel_error(sdpa_own, want)
        errors[name] = {"rel_error": err, "sdpa_rel_error": sdpa_err, "ok": bool(torch.isfinite(got).all()) and err <= 2 * sdpa_err + ERROR_FLOOR[dtype]}
    with torch.no_grad():  # the inference path (its own mask and tiles) meets the same bound
        inference = rel_error(pbs_attention(q, k, v, cfg, q_offset=offset), exact[0])
    same_forward = inference <= 2 * errors["out"]["sdpa_rel_error"] + ERROR_FLOOR[dtype]
    return {"check": f"gradients {method} {str(dtype)[6:]} d={head_dim} L={length} q_len={q.shape[2]} {overrides or ''}",
            "density": plan.density, "permuted_heads": float(plan.permuted_heads.float().mean()), **errors,
            "inference_rel_error": inference, "ok": same_forward and all(e["ok"] for e in errors.values())}


def training(length: int = 2048, steps: int = 4) -> dict:
    """``model.train()`` on CUDA with ``attn_implementation="flex_pbs"`` (tiny Llama, fp32): at
    threshold 1.0 the loss and gradients are SDPA's (fp32, summation order only: 1e-4); at 0.9
    with gradient checkpointing, gradients are finite and AdamW lowers the loss every step."""
    import flex_pbs
    from flex_pbs.runner.models import random_model, tiny_config

    ids = torch.randint(0, 1024, (2, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def step(model, checkpointing=False):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters()}

    ref_loss, ref_grads = step(random_model(tiny_config("llama"), "sdpa", seed=1).to(DEVICE))
    flex_pbs.register(PBSConfig(threshold=1.0), collect_stats=True, overwrite=True)
    loss, grads = step(random_model(tiny_config("llama"), "flex_pbs", seed=1).to(DEVICE))
    worst = max(rel_error(grads[name], grad) for name, grad in ref_grads.items())
    flex_pbs.register(PBSConfig(threshold=0.9), collect_stats=True, overwrite=True)
    model = random_model(tiny_config("llama"), "flex_pbs", seed=1).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, finite = [], True
    for _ in range(steps):
        optimizer.zero_grad()
        sparse_loss, sparse_grads = step(model, checkpointing=True)
        finite &= all(bool(torch.isfinite(g).all()) for g in sparse_grads.values())
        optimizer.step()
        losses.append(sparse_loss)
    density = float(sum(s.density.mean() for s in flex_pbs.stats(model).values()) / len(flex_pbs.stats(model)))
    flex_pbs.unregister()
    falls = all(b < a for a, b in itertools.pairwise(losses))
    return {"check": f"training tiny llama L={length}", "loss_rel_diff": abs(loss - ref_loss) / ref_loss,
            "worst_grad_rel_error": worst, "sparse_losses": losses, "sparse_density": density, "finite": finite,
            "ok": abs(loss - ref_loss) <= 1e-6 * ref_loss and worst < 1e-4 and finite and falls and density < 1}


def check_name(check) -> str:
    """A check's function and arguments, for the report of one that raised."""
    if isinstance(check, partial):
        arguments = [str(a)[6:] if isinstance(a, torch.dtype) else str(a) for a in check.args]
        return " ".join([check.func.__name__, *arguments, *(f"{k}={v}" for k, v in check.keywords.items())])
    return check.__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="cuda_smoke.json")
    parser.add_argument("--only", choices=["matrix", "head_dims", "other", "grad"], help="run one group of checks")
    named = [name for name, cfg in METHODS.items() if cfg is not None]
    parser.add_argument("--methods", nargs="+", choices=named, default=named, help="the matrix's methods")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=["float32", "bfloat16", "float16"], help="the matrix's and the gradients' dtypes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_smoke.py needs a CUDA device")
    methods = args.methods
    dtypes = [getattr(torch, name) for name in args.dtypes]
    matrix = [
        partial(method_matrix, m, dt, d, n)
        for m in methods for dt in dtypes for d in (64, 128) for n in (2048, 2000)
    ]
    other_head_dims = [  # without tuned tiles, and fp32 at 256, where the fused planning does not fit
        partial(method_matrix, m, dt, d, 2000) for m in ("pbs", "pbs_antidiagonal", "pbs_fine")
        for dt in (torch.float32, torch.bfloat16) for d in (96, 256)
    ] + [partial(method_matrix, "pbs", torch.bfloat16, d, 2000, scoring_fp8=True) for d in (128, 256)]
    other = [
        guard_diagnosis,
        partial(exact_vs_sdpa, 128, 8192, "auto"),
        partial(exact_vs_sdpa, 96, 4096, "auto"),  # not a power of two: torch planning stages
        partial(exact_vs_sdpa, 64, 4096, "triton"),
        partial(exact_vs_sdpa, 128, 5000, "auto"),  # ragged length
        partial(exact_vs_sdpa, 128, 8192, "auto", block_size=64),  # tiles must divide the blocks
        partial(exact_vs_sdpa, 64, 4096, "auto", block_size=32),
        partial(exact_vs_sdpa, 128, 8192, "auto", key_block_size=64),  # 128 x 64 blocks
        partial(chunked_exact, 9000, 3001),
        partial(fused_vs_torch_plan, 16384),
        partial(fused_vs_torch_plan, 16384, key_block_size=None, force_local_blocks=4, peak_weight=0.0),  # pbs_fast
        partial(fused_vs_torch_plan, 16384, key_block_size=None, permute="key", segment_size=256),  # pbs_antidiagonal
        partial(shared_index_buffer, 20000),
        partial(shared_index_buffer, 20000, max_density=0.1),
        partial(fp8_scoring, 16384),
        partial(fused_scores_vs_torch, torch.float32),
        partial(fused_scores_vs_torch, torch.bfloat16),
        partial(fused_scores_vs_torch, torch.float32, 0.5),
        partial(fused_scores_vs_torch, torch.bfloat16, 0.5),
        partial(fused_scores_vs_torch, torch.bfloat16, 0.5, block_size=64),
        partial(fp8_scoring, 16384, 0.5),
        no_host_sync,
    ]
    grad = [  # merged 128 x 64 blocks, unmerged 128 x 128 (permuted), merged 64 x 64; mixed permuted heads
        partial(gradients, m, dt, 128, 2048)
        for m in ("pbs", "pbs_unpermuted", "pbs_antidiagonal", "pbs_fine") for dt in (torch.float32, torch.bfloat16)
        if dt in dtypes
    ] + [
        partial(gradients, "pbs", torch.bfloat16, 64, 2048),
        partial(gradients, "pbs", torch.bfloat16, 128, 2000),  # ragged
        partial(gradients, "pbs_antidiagonal", torch.bfloat16, 128, 4000, q_len=1500),  # chunk at an offset
        partial(gradients, "pbs", torch.bfloat16, 128, 4096, permute="key"),
        partial(gradients, "pbs", torch.bfloat16, 128, 2048, threshold=1.0),
    ] * (torch.bfloat16 in dtypes) + [training] * (torch.float32 in dtypes)
    groups = {"matrix": matrix, "head_dims": other_head_dims, "other": other, "grad": grad}
    checks = groups[args.only] if args.only else [check for group in groups.values() for check in group]
    results = []
    for check in checks:
        start = time.perf_counter()
        try:
            result = check()
        except Exception as error:  # report every check, then fail
            result = {"check": check_name(check), "ok": False, "error": repr(error)[:500]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
        print(json.dumps(result), flush=True)
    failed = [r["check"] for r in results if not r["ok"]]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": results}, f, indent=1)
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
