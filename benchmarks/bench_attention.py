"""Attention-level benchmark: dense SDPA, dense causal FlexAttention and named PBS methods,
stage by stage.

Everything runs in one process on the same inputs. Times are CUDA-event medians from
``triton.testing.do_bench`` after warm-up (compilation happens before timing); memory is the
peak allocated during one call, inputs included. Recall is the exact share of dense attention
mass inside the computed blocks, on a subsample of query blocks (always including the last).
Stages: importance (the last query block's attention to every key), sort (inside segments),
gather (K and V into the permuted layout), score, select, build (the BlockMask), attend;
restoring the order costs nothing (only keys move: the output is in query order already).

    python benchmarks/bench_attention.py                       # planted workload, 8K..128K
    python benchmarks/bench_attention.py --methods pbs xattention pbs_antidiagonal \
        xattention:segment_size=256 --thresholds 0.9 --lengths 32768 131072
    python benchmarks/bench_attention.py --workload vertical_slash --max-density 0.1
    python benchmarks/bench_attention.py --workload captured --captured qkv.pt
    python benchmarks/bench_attention.py --check               # correctness at 32K, then exit

``--workload`` is a family of ``flex_pbs.analysis.workloads.WORKLOADS`` (``planted``, the
default, is ``scattered``: the same inputs as before the families existed); ``captured`` reads
``--captured`` (a ``capture_workload`` file, or any ``torch.save``'d dict with ``q``, ``k``, ``v``
``[B, H, L, D]``) at its own batch, heads and head_dim.

A method is a name from ``flex_pbs.engine.methods`` with optional ``:field=value,...`` overrides;
``--thresholds``/``--scoring-fp8`` and the geometry flags apply to every method. Every method
runs without a budget (rows ``budget=none``: what it computes by default) and, when
``--max-density`` is given, again with that budget (``budget=<x>``); a method's own
``:max_density=...`` replaces both.

Writes ``--out`` (JSON) and prints a table. Needs CUDA and Triton; no Hydra.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flex_pbs import PBSConfig, build_plan, pbs_attention  # noqa: E402
from flex_pbs.analysis.metrics import attention_recall, sample_query_blocks  # noqa: E402
from flex_pbs.analysis.synthetic import planted_qkv  # noqa: E402
from flex_pbs.analysis.workloads import (
    DEFAULT_CAPTURED_PATH,
    WORKLOADS,
    captured_qkv,
    captured_shape,
)
from flex_pbs.engine.attend import flex_attend  # noqa: E402
from flex_pbs.engine.layout import BlockLayout  # noqa: E402
from flex_pbs.engine.mask import build_stage  # noqa: E402
from flex_pbs.engine.methods import method_config  # noqa: E402
from flex_pbs.engine.permute import (  # noqa: E402  # noqa: E402
    gather_stage,
    importance_stage,
    permute_keys,
    permute_stage,
    order_stage,
)
from flex_pbs.engine.score import score_stage  # noqa: E402
from flex_pbs.engine.select import select_stage  # noqa: E402


def bench_ms(fn, rep_ms: int = 200, grads: list[torch.Tensor] | None = None) -> float:
    """CUDA-event median of ``fn`` (``grads``: tensors whose ``.grad`` is reset between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=grads, return_mode="median"))


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def causal_block_mask(length: int, block_size: int, device: torch.device) -> BlockMask:
    """Dense causal BlockMask from block tensors (full below the diagonal, partial on it)."""
    n = -(-length // block_size)
    rows = torch.arange(n, device=device)
    partial_idx = rows.view(1, 1, n, 1).expand(1, 1, n, n).to(torch.int32).contiguous()
    full_idx = torch.arange(n, device=device, dtype=torch.int32).expand(1, 1, n, n).contiguous()
    return BlockMask.from_kv_blocks(
        torch.ones(1, 1, n, dtype=torch.int32, device=device),
        partial_idx,
        rows.to(torch.int32).view(1, 1, n),
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx,
        seq_lengths=(length, length),
    )


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def load_workload(args, length: int):
    """bf16 CUDA Q ``[B, Hq, L, D]``, K and V ``[B, Hkv, L, D]`` of ``--workload`` at ``length``."""
    options = {"seed": args.seed, "dtype": torch.bfloat16, "device": "cuda"}
    if args.workload == "captured":
        batch, q_heads, kv_heads, stored_len, head_dim = captured_shape(args.captured)
        if stored_len < length:
            raise SystemExit(f"{args.captured} holds {stored_len} tokens, fewer than {length}")
        return captured_qkv(batch, q_heads, kv_heads, length, head_dim, path=args.captured, **options)
    family = "scattered" if args.workload == "planted" else args.workload
    return WORKLOADS[family](1, args.q_heads, args.kv_heads, length, args.head_dim, **options)


# Geometry flags that override every method's field when given (``--max-density`` is a budget
# row of its own: see run_length).
OVERRIDE_FLAGS = ("block_size", "key_block_size", "segment_size", "stride", "scoring", "peak_weight", "permute",
                  "force_local_blocks")


def parse_method(method: str) -> tuple[str, dict]:
    """``name[:field=value,...]`` as the method's name and its fields (values parsed as JSON
    when they look like numbers, lists or dicts; ``None`` is None; anything else a string)."""
    name, _, items = method.partition(":")
    fields = {}
    for item in filter(None, items.split(",")):
        key, _, value = item.partition("=")
        fields[key] = None if value == "None" else json.loads(value) if value[:1] in "0123456789-[{" else value
    return name, fields


def method_at(method: str, threshold: float) -> PBSConfig:
    """The config of ``name[:field=value,...]`` at ``threshold`` (the method's own fields win);
    a wrong name or field exits with one line."""
    name, fields = parse_method(method)
    if name == "dense":
        raise SystemExit("'dense' computes every block (density 1, recall 1; timed as SDPA); name a PBS method")
    try:
        return method_config(name, **{"threshold": threshold, **fields})
    except (ValueError, TypeError) as error:
        raise SystemExit(f"{method}: {error}") from None


def method_of(args, method: str, **changes) -> PBSConfig:
    """The config of ``name[:field=value,...]`` from ``flex_pbs.engine.methods``: ``changes``,
    then the method's own fields, then the command line's overrides."""
    name, fields = parse_method(method)
    changes.update(fields)
    changes.update({f: getattr(args, f) for f in OVERRIDE_FLAGS if getattr(args, f) is not None})
    if args.scoring_fp8:
        changes["scoring_fp8"] = True
    cfg = method_config(name, **changes)
    if cfg is None:
        raise SystemExit("'dense' is timed as SDPA in every table; name a PBS method")
    return cfg


def bench_method(q, k, v, cfg: PBSConfig, args) -> dict:
    """Time, density, recall, peak memory and stage times of one config on one input."""
    length, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    layout = BlockLayout.from_config(cfg, length, length)
    permuted = cfg.permute != "none"
    pbs_attention(q, k, v, cfg)  # compiles
    torch.cuda.empty_cache()
    peak = peak_gib(lambda: pbs_attention(q, k, v, cfg))  # nothing else alive but q, k, v
    _, plan = pbs_attention(q, k, v, cfg, return_plan=True)
    key_order, k_perm = permute_stage(q, k, layout, cfg, scale)
    v_perm = gather_stage(v, key_order, cfg) if permuted else v  # as pbs_attention does
    scores = score_stage(q, k_perm, key_order, layout, cfg, scale)
    selected, indices = select_stage(scores, key_order, layout, cfg)
    mask = build_stage(indices, key_order, layout, permuted)
    stages = {"importance": 0.0, "sort": 0.0, "gather": 0.0}
    if permuted:
        importance = importance_stage(q, k, layout, cfg, scale)
        stages["importance"] = bench_ms(lambda: importance_stage(q, k, layout, cfg, scale))
        stages["sort"] = bench_ms(lambda: order_stage(importance, layout, cfg))
        stages["gather"] = bench_ms(lambda: (gather_stage(k, key_order, cfg), gather_stage(v, key_order, cfg)))
        del importance
    stages.update({
        "score": bench_ms(lambda: score_stage(q, k_perm, key_order, layout, cfg, scale)),
        "select": bench_ms(lambda: select_stage(scores, key_order, layout, cfg)),
        "build": bench_ms(lambda: build_stage(indices, key_order, layout, permuted)),
        "attend": bench_ms(lambda: flex_attend(q, k_perm, v_perm, mask, scale, keys_in_order=not permuted)),
        "restore": 0.0,  # queries keep their order: nothing to undo
    })
    total = bench_ms(lambda: pbs_attention(q, k, v, cfg))
    blocks = sample_query_blocks(plan.layout.num_q_blocks, args.recall_blocks, seed=args.seed).to(q.device)
    recall = float(attention_recall(q, k, plan, query_blocks=blocks).mean())
    finite = bool(torch.isfinite(pbs_attention(q, k, v, cfg)).all())
    result = {"config": str(cfg), "ms": total, "density": plan.density, "recall": recall, "finite": finite,
              "permuted_heads": float(plan.permuted_heads.float().mean()),
              "peak_gib": peak, **{f"{name}_ms": ms for name, ms in stages.items()},
              "permutation_ms": sum(stages[s] for s in ("importance", "sort", "gather", "restore")),
              "overhead_ms": sum(stages[s] for s in stages if s != "attend")}
    del plan, k_perm, v_perm, scores, selected, indices, mask
    torch.cuda.empty_cache()
    return result


def run_length(args, length: int, rows: list[dict]) -> None:
    q, k, v = load_workload(args, length)
    scale = 1.0 / math.sqrt(q.shape[-1])
    shape = f"{q.shape[1]}/{k.shape[1]}x{q.shape[-1]}"
    base = {"workload": args.workload, "L": length, "shape": shape}

    sdpa_ms = bench_ms(lambda: sdpa(q, k, v, scale))
    sdpa_peak = peak_gib(lambda: sdpa(q, k, v, scale))
    rows.append({**base, "method": "sdpa", "ms": sdpa_ms, "speedup": 1.0, "density": 1.0, "peak_gib": sdpa_peak})

    dense_mask = causal_block_mask(length, 128, q.device)
    flex_attend(q, k, v, dense_mask, scale)
    flex_ms = bench_ms(lambda: flex_attend(q, k, v, dense_mask, scale))
    rows.append({**base, "method": "flex dense causal", "ms": flex_ms, "speedup": sdpa_ms / flex_ms, "density": 1.0,
                 "peak_gib": peak_gib(lambda: flex_attend(q, k, v, dense_mask, scale))})
    del dense_mask

    # Without a budget first: what a method computes by default at this threshold.
    budgets = [None] + ([args.max_density] if args.max_density is not None else [])
    timed = set()
    for method in args.methods:
        for threshold in args.thresholds:
            for budget in budgets:
                for backend in args.backends:
                    cfg = method_of(args, method, threshold=threshold, backend=backend, max_density=budget)
                    if (method, cfg) in timed:  # its own max_density made the budgets equal
                        continue
                    timed.add((method, cfg))
                    rows.append({**base, **bench_method(q, k, v, cfg, args), "method": method,
                                 "threshold": threshold, "backend": backend, "max_density": cfg.max_density,
                                 "budget": "none" if cfg.max_density is None else f"{cfg.max_density:g}"})
                    rows[-1]["speedup"] = sdpa_ms / rows[-1]["ms"]
                    rows[-1]["overhead_vs_sdpa"] = rows[-1]["overhead_ms"] / sdpa_ms
                    rows[-1]["permutation_vs_sdpa"] = rows[-1]["permutation_ms"] / sdpa_ms
                    rows[-1]["attend_vs_ideal"] = rows[-1]["attend_ms"] / (rows[-1]["density"] * sdpa_ms)
                    print(json.dumps(rows[-1]), flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def recompile_probe(args) -> dict:
    """Ten lengths in one process (half of them multiples of 128, which FlexAttention runs
    without bounds masks): how many graphs compile, and does a second pass recompile?"""
    from torch._dynamo.utils import counters

    cfg = method_of(args, args.methods[0], max_density=args.max_density)
    before = counters["stats"]["unique_graphs"]
    lengths = [8192 + 1024 * i + 101 * (i % 2) for i in range(10)]
    start = time.perf_counter()
    for n in lengths:
        q, k, v = planted_qkv(1, args.q_heads, args.kv_heads, n, args.head_dim, dtype=torch.bfloat16, device="cuda")
        pbs_attention(q, k, v, cfg)
    first_pass_s = time.perf_counter() - start
    compiled = counters["stats"]["unique_graphs"] - before
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in lengths:
            q, k, v = planted_qkv(1, args.q_heads, args.kv_heads, n, args.head_dim, dtype=torch.bfloat16, device="cuda")
            pbs_attention(q, k, v, cfg)
    return {"lengths": lengths, "graphs_compiled": compiled, "first_pass_s": first_pass_s, "second_pass_recompiles": 0}


def exact_rows(q, k, v, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 causal attention for some query rows only (an fp32 SDPA of the whole input would
    materialise L² scores): ``[B, Hq, len(rows), D]``."""
    group = q.shape[1] // k.shape[1]
    k32, v32 = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    outs = []
    for chunk in rows.split(256):
        logits = q[:, :, chunk].float() @ k32.transpose(-1, -2) * scale
        logits = logits.masked_fill(torch.arange(k.shape[2], device=q.device) > chunk[:, None], float("-inf"))
        outs.append(torch.softmax(logits, -1) @ v32)
    return torch.cat(outs, dim=2)


def correctness_check(args) -> dict:
    """Threshold 1.0 must equal dense attention; errors vs an fp32 reference on sampled rows."""
    length = args.check_length
    q, k, v = planted_qkv(1, args.q_heads, args.kv_heads, length, args.head_dim, dtype=torch.bfloat16, device="cuda")
    scale = 1.0 / math.sqrt(args.head_dim)
    blocks = sample_query_blocks(-(-length // 128), 8, seed=args.seed)
    rows = torch.cat([torch.arange(b * 128, min((b + 1) * 128, length)) for b in blocks.tolist()])
    rows = rows.to(q.device)
    ref = exact_rows(q, k, v, rows, scale)

    def rel(out):
        return float((out[:, :, rows].float() - ref).norm() / ref.norm())

    result = {"L": length, "rows_checked": int(rows.numel()), "sdpa_bf16": rel(sdpa(q, k, v, scale))}
    fused = build_plan(q, k, PBSConfig(threshold=0.9, permute="key", segment_size=256))
    plain = build_plan(q, k, PBSConfig(threshold=0.9, permute="key", segment_size=256, backend="torch"))
    result["fused_vs_torch_plan"] = {
        "key_order_equal_share": float((fused.key_order == plain.key_order).float().mean()),
        "blocks_differing": float((fused.block_mask != plain.block_mask).float().mean()),
        "density": [fused.density, plain.density],
    }
    del fused, plain
    checks = {"thr=1.0": PBSConfig(threshold=1.0), "thr=1.0 permute=key": PBSConfig(threshold=1.0, permute="key", segment_size=256),
              "thr=0.9": PBSConfig(threshold=0.9)}
    for name, cfg in checks.items():
        start = time.perf_counter()
        out, plan = pbs_attention(q, k, v, cfg, return_plan=True)
        torch.cuda.synchronize()
        result[name] = {"first_call_s": time.perf_counter() - start, "rel_error": rel(out), "density": plan.density}
    return result


SCORER_CONFIGS = [  # (tile_slots, num_warps, num_stages, fp8); more were tried: docs/design.md
    (128, 8, 3, False), (256, 8, 2, False), (128, 8, 4, True), (256, 8, 3, True), (256, 8, 4, True),
    (64, 4, 3, True), (64, 8, 3, True), (128, 4, 3, True), (128, 8, 3, True),  # for --peak-weight
]
# None: flex_pbs's default_kernel_options; {}: FlexAttention's own defaults. Others tried: docs/design.md.
FLEX_OPTIONS = [None, {}]


def tune(args) -> list[dict]:
    """Time the fused scorer's tile configurations and FlexAttention kernel options."""
    from flex_pbs.engine.kernels.antidiagonal import antidiagonal_block_scores_fused

    results = []
    for length in args.lengths:
        q, k, v = load_workload(args, length)
        scale = 1.0 / math.sqrt(q.shape[-1])
        cfg = method_of(args, args.methods[0], max_density=args.max_density)
        layout = BlockLayout.from_config(cfg, length, length)
        key_order, k_perm = permute_stage(q, k, layout, cfg, scale)
        sdpa_ms = bench_ms(lambda: sdpa(q, k, v, scale))
        reference = None
        for tile_slots, warps, stages, fp8 in SCORER_CONFIGS if not args.tune_attend_only else []:
            name = f"score slots={tile_slots} warps={warps} stages={stages} fp8={fp8}"
            kwargs = dict(tile_slots=tile_slots, num_warps=warps, num_stages=stages, fp8=fp8,
                          peak_weight=cfg.peak_weight)
            try:
                def run():
                    return antidiagonal_block_scores_fused(q, k_perm, key_order, layout, cfg.stride, scale, **kwargs)
                scores = run()
                ms = bench_ms(run)
            except Exception as error:  # a tile that does not fit shared memory, say
                results.append({"L": length, "what": name, "error": str(error)[:200]})
                continue
            row = {"L": length, "what": name, "ms": ms, "vs_sdpa": ms / sdpa_ms}
            if reference is None:
                reference = scores
            else:
                row["max_abs_diff"] = float((scores - reference).abs().max())
                sel_ref = select_stage(reference, key_order, layout, cfg)[0]
                sel = select_stage(scores, key_order, layout, cfg)[0]
                row["blocks_differing"] = float((sel != sel_ref).float().mean())
                row["density"] = float(sel.float().mean())
            results.append(row)
            print(row, flush=True)
        plan = pbs_attention(q, k, v, cfg, return_plan=True)[1]
        v_perm = permute_keys(v, key_order)
        for options in args.flex_options or FLEX_OPTIONS:
            try:
                flex_attend(q, k_perm, v_perm, plan.flex_mask, scale, kernel_options=options)
                ms = bench_ms(lambda: flex_attend(q, k_perm, v_perm, plan.flex_mask, scale, kernel_options=options))
                row = {"L": length, "what": f"attend {options}", "ms": ms, "density": plan.density,
                       "vs_ideal": ms / (plan.density * sdpa_ms)}
            except Exception as error:
                row = {"L": length, "what": f"attend {options}", "error": str(error)[:200]}
            results.append(row)
            print(row, flush=True)
        del q, k, v, k_perm, v_perm, plan
        torch.cuda.empty_cache()
    return results


def print_table(rows: list[dict]) -> None:
    cols = ["workload", "L", "method", "threshold", "budget", "ms", "speedup", "density", "recall", "finite",
            "peak_gib", "overhead_vs_sdpa", "permutation_vs_sdpa", "importance_ms", "sort_ms", "gather_ms", "score_ms",
            "select_ms", "build_ms", "attend_ms", "restore_ms", "attend_vs_ideal"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            value = row.get(c, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["planted", *WORKLOADS], default="planted",
                        help="a workload family (planted = scattered)")
    parser.add_argument("--captured", default=str(DEFAULT_CAPTURED_PATH),
                        help="--workload captured: a torch.save'd dict with q, k, v [B, H, L, D] (default: %(default)s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--backends", nargs="+", default=["auto"])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["pbs"],
                        help="named methods, each optionally name:field=value,... (e.g. xattention:segment_size=256)")
    parser.add_argument("--block-size", type=int, help="PBSConfig.block_size for every method")
    parser.add_argument("--key-block-size", type=int, help="PBSConfig.key_block_size for every method")
    parser.add_argument("--segment-size", type=int, help="PBSConfig.segment_size for every method")
    parser.add_argument("--stride", type=int, help="PBSConfig.stride for every method")
    parser.add_argument("--scoring", help="PBSConfig.scoring for every method")
    parser.add_argument("--peak-weight", type=float, help="PBSConfig.peak_weight for every method")
    parser.add_argument("--permute", help="PBSConfig.permute for every method")
    parser.add_argument("--force-local-blocks", type=int, help="PBSConfig.force_local_blocks for every method")
    parser.add_argument("--max-density", type=float,
                        help="also run every method with this PBSConfig.max_density budget (rows budget=<x>)")
    parser.add_argument("--scoring-fp8", action="store_true", help="PBSConfig.scoring_fp8 (Hopper)")
    parser.add_argument("--recall-blocks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only the correctness check")
    parser.add_argument("--check-length", type=int, default=32768)
    parser.add_argument("--recompile-probe", action="store_true")
    parser.add_argument("--tune", action="store_true", help="time scorer tiles and flex kernel options")
    parser.add_argument("--tune-attend-only", action="store_true", help="--tune: only the flex kernel options")
    parser.add_argument("--flex-options", type=json.loads, nargs="+", metavar="JSON",
                        help="--tune: FlexAttention kernel options to time, e.g. '{\"num_stages\": 4}' "
                             "(null: flex_pbs's defaults; {}: FlexAttention's own)")
    parser.add_argument("--out", default="bench_attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device")

    import triton

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    if args.check:
        report["check"] = correctness_check(args)
        print(json.dumps(report["check"], indent=1))
    elif args.tune:
        report["tune"] = tune(args)
    else:
        rows: list[dict] = []
        for length in args.lengths:
            run_length(args, length, rows)
            print(f"done L={length}", flush=True)
        report["rows"] = rows
        if args.recompile_probe:
            report["recompile_probe"] = recompile_probe(args)
            print(json.dumps(report["recompile_probe"]))
        print_table(rows)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
