"""Density and recall of named methods on every workload family, on the CPU (plans only).

For each family of ``flex_pbs.analysis.workloads.WORKLOADS``, each length and each method, the
plan is built (``build_plan``: no attention runs) at ``--threshold`` without a budget, and
reported as density (computed causal blocks / causal blocks) and recall (the exact share of
dense attention mass inside the computed blocks, on ``--recall-blocks`` sampled query blocks,
the last one included; mean over batch and heads, and the worst head).

    python benchmarks/workload_density.py                         # 8K, every family, 6 methods
    python benchmarks/workload_density.py --lengths 2048 --families a_shape scattered
    python benchmarks/workload_density.py --capture               # capture SmolLM2's Q/K/V first

A method is ``name[:field=value,...]`` as in bench_attention.py. The synthetic families run at
``--batch/--q-heads/--kv-heads/--head-dim``; ``captured`` at the file's own shape (SmolLM2: the
captured layers as batch, 9 query / 3 KV heads, head_dim 64). Prints a markdown table and
writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# The repository (flex_pbs) and this folder (bench_attention's method syntax).
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_attention import method_at

from flex_pbs import PBSConfig, build_plan
from flex_pbs.analysis.metrics import attention_recall, sample_query_blocks
from flex_pbs.analysis.workloads import (
    DEFAULT_CAPTURED_PATH,
    WORKLOADS,
    capture_workload,
    captured_qkv,
    captured_shape,
)

DEFAULT_METHODS = ("pbs", "pbs_fast", "xattention", "pbs_antidiagonal", "pbs:scoring=oracle",
                   "pbs_antidiagonal:scoring=oracle")
COLUMNS = ("family", "L", "method", "density", "recall", "recall_min_head", "permuted_heads", "plan_s")


def family_inputs(family: str, length: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, Hq, L, D]`` and ``k: [B, Hkv, L, D]`` of one family at ``length``, in
    ``--dtype`` on ``--device``."""
    if family == "captured":
        batch, q_heads, kv_heads, stored_len, head_dim = captured_shape(args.captured)
        if length > stored_len:
            raise SystemExit(f"{args.captured} holds {stored_len} tokens, fewer than {length}")
        q, k, _ = captured_qkv(batch, q_heads, kv_heads, length, head_dim, path=args.captured)
    else:
        q, k, _ = WORKLOADS[family](args.batch, args.q_heads, args.kv_heads, length, args.head_dim, seed=args.seed,
                                    device=args.device)
    dtype = getattr(torch, args.dtype)
    return q.to(args.device, dtype), k.to(args.device, dtype)


def measure(q: torch.Tensor, k: torch.Tensor, cfg: PBSConfig, recall_blocks: int, seed: int) -> dict:
    """Density and recall of ``cfg``'s plan for ``q: [B, Hq, L, D]``, ``k: [B, Hkv, L, D]``."""
    synchronize = torch.cuda.synchronize if q.is_cuda else (lambda: None)  # honest wall time on a GPU
    synchronize()
    start = time.perf_counter()
    plan = build_plan(q, k, cfg)
    synchronize()
    plan_s = time.perf_counter() - start
    blocks = sample_query_blocks(plan.layout.num_q_blocks, recall_blocks, seed=seed)
    recall = attention_recall(q, k, plan, query_blocks=blocks)
    return {"density": plan.density, "recall": float(recall.mean()), "recall_min_head": float(recall.min()),
            "permuted_heads": float(plan.permuted_heads.float().mean()),
            "plan_s": plan_s}


def run(args) -> list[dict]:
    """One row per family, length and method, printed as it comes."""
    configs = {method: method_at(method, args.threshold) for method in args.methods}
    rows = []
    for family in args.families:
        for length in args.lengths:
            q, k = family_inputs(family, length, args)
            for method, cfg in configs.items():
                row = {"family": family, "L": length, "method": method, "threshold": args.threshold,
                       "shape": f"{q.shape[0]}x{q.shape[1]}/{k.shape[1]}x{q.shape[-1]}",
                       **measure(q, k, cfg, args.recall_blocks, args.seed)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """``COLUMNS`` of every row as a markdown table (floats to 3 decimals)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="named methods, each optionally name:field=value,... (e.g. pbs:scoring=oracle)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--recall-blocks", type=int, default=16, help="query blocks sampled for recall")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic families' seed and the recall sample's")
    parser.add_argument("--captured", type=Path, default=DEFAULT_CAPTURED_PATH, help="the captured family's file")
    parser.add_argument("--capture", action="store_true",
                        help="capture --captured from SmolLM2 first if it is missing (a few minutes)")
    parser.add_argument("--device", default="cpu", help="where plans are made (cuda: the fused planning kernels)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("workload_density.json"))
    args = parser.parse_args(argv)
    if args.recall_blocks < 1:
        parser.error(f"--recall-blocks must be >= 1, got {args.recall_blocks}")
    if "captured" in args.families and not args.captured.is_file():
        if not args.capture:
            parser.error(f"{args.captured} does not exist: pass --capture to create it, or leave out "
                         f"'captured' with --families")
        capture_workload(args.captured)
    return args


def main(argv=None) -> dict:
    """Run the table; returns the JSON report written to ``--out``."""
    args = parse_args(argv)
    rows = run(args)
    report = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    print(markdown_table(rows))
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
