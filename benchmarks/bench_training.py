"""Training-step attention benchmark: forward + backward of named PBS methods against SDPA's.

One process, the same bf16 inputs (``--workload``, as in ``bench_attention.py``). Each method
(``name[:field=value,...]``, as in ``bench_attention.py``) runs at ``--threshold`` without a
budget and again with each ``--max-density`` budget. A row
times ``out = attention(q, k, v); out.backward(dout)`` (planning included: it runs in every
training step) as the CUDA-event median of ``triton.testing.do_bench`` after warm-up
(compilation happens before timing); ``forward_ms`` is the same call under ``torch.no_grad``.
Memory is the peak allocated during one forward + backward, inputs and gradients included.

    python benchmarks/bench_training.py                                  # 32K and 128K
    python benchmarks/bench_training.py --lengths 131072 --methods pbs pbs_unpermuted
    python benchmarks/bench_training.py --methods pbs pbs:key_block_size=128   # blocks the backward tiles as they are

Writes ``--out`` (JSON) and prints a table. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import bench_ms, method_at, peak_gib  # noqa: E402

from flex_pbs import pbs_attention  # noqa: E402
from flex_pbs.analysis.workloads import WORKLOADS  # noqa: E402


def run_length(args, length: int) -> list[dict]:
    q, k, v = WORKLOADS[args.workload](1, args.q_heads, args.kv_heads, length, args.head_dim, seed=args.seed,
                                       dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    configs = {("sdpa", None): None}
    for method in args.methods:
        for budget in (None, *args.max_density):
            configs[(method, budget)] = method_at(method, args.threshold).replace(max_density=budget)
    rows = []
    for (method, budget), cfg in configs.items():
        def attend(cfg=cfg):
            if cfg is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return pbs_attention(q, k, v, cfg)

        def step(attend=attend):
            attend().backward(dout)

        def forward(attend=attend):
            with torch.no_grad():
                attend()

        step()  # compiles forward and backward
        with torch.no_grad():  # and the no-grad forward
            density = 1.0 if cfg is None else pbs_attention(q, k, v, cfg, return_plan=True)[1].density
        grads = [q, k, v]
        row = {"length": length, "method": method, "budget": budget if budget is not None else "none",
               "density": density, "fwd_bwd_ms": bench_ms(step, grads=grads), "forward_ms": bench_ms(forward, grads=grads),
               "peak_gib": peak_gib(step)}
        q.grad = k.grad = v.grad = None
        rows.append(row)
    sdpa_ms = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["x_sdpa"] = sdpa_ms / row["fwd_bwd_ms"]
        print(f"{row['length']:>7} {row['method']:<16} {row['budget']!s:>6} {row['density']:>7.3f} "
              f"{row['fwd_bwd_ms']:>10.1f} {row['forward_ms']:>9.1f} {row['x_sdpa']:>7.2f} {row['peak_gib']:>7.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--methods", nargs="+", default=["pbs"], help="name[:field=value,...]")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-density", type=float, nargs="*", default=[0.05, 0.10])
    parser.add_argument("--workload", default="scattered", choices=[w for w in WORKLOADS if w != "captured"])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_training.json")
    args = parser.parse_args(argv)
    for method in args.methods:  # a wrong name or field fails before any GPU work
        method_at(method, args.threshold)
    if not torch.cuda.is_available():
        sys.exit("bench_training.py needs a CUDA device (FlexAttention has no backward on CPU)")
    print(f"{'length':>7} {'method':<16} {'budget':>6} {'density':>7} {'fwd+bwd ms':>10} {'fwd ms':>9} {'x SDPA':>7} {'peak GiB':>7}")
    rows = [row for length in args.lengths for row in run_length(args, length)]
    import triton

    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "workload": args.workload, "heads": [args.q_heads, args.kv_heads], "head_dim": args.head_dim,
        "threshold": args.threshold, "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
