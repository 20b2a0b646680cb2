"""Does the memory layout attention receives inside a transformers model change the speed?

transformers hands attention ``q/k/v`` as ``[B, L, H, D]`` buffers viewed as ``[B, H, L, D]``
(row stride ``H·D`` instead of ``D``); ``bench_attention.py`` times contiguous inputs. This
times dense SDPA, the sparse attend stage alone (``flex_attend`` on a fixed plan) and the whole
``pbs_attention`` in both layouts, on planted and on random (near-uniform) inputs, at 128K with
Llama-3.1-8B heads (32/8, head_dim 128, bf16), fp8 scoring, ``max_density`` 0.05 and 0.10.

    python benchmarks/layout_probe.py [--length 131072] [--out layout_probe.json]

Prints a table and writes JSON. Needs CUDA and Triton; no Hydra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flex_pbs import PBSConfig, build_plan, pbs_attention  # noqa: E402
from flex_pbs.engine.attend import flex_attend  # noqa: E402
from flex_pbs.analysis.synthetic import planted_qkv  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def inputs(workload: str, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous bf16 ``q [1, 32, L, 128]``, ``k, v [1, 8, L, 128]`` on the GPU."""
    if workload == "planted":
        return planted_qkv(1, Q_HEADS, KV_HEADS, length, HEAD_DIM, seed=0, dtype=torch.bfloat16, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    return tuple(
        torch.randn(1, heads, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        for heads in (Q_HEADS, KV_HEADS, KV_HEADS)
    )


def model_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values stored as ``[B, L, H, D]`` and viewed as ``[B, H, L, D]``."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--out", default="layout_probe.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("layout_probe.py needs a CUDA device")
    scale = HEAD_DIM**-0.5
    rows = []
    for workload in ("planted", "random"):
        q, k, v = inputs(workload, args.length)
        layouts = {"contiguous": (q, k, v), "model": tuple(model_layout(t) for t in (q, k, v))}
        for cap in (0.05, 0.1):
            config = PBSConfig(max_density=cap, scoring_fp8=True)
            plan = build_plan(q, k, config)
            for name, (lq, lk, lv) in layouts.items():
                row = {
                    "workload": workload, "max_density": cap, "layout": name, "density": plan.density,
                    "attend_ms": median_ms(lambda: flex_attend(lq, lk, lv, plan.flex_mask, scale)),
                    "pbs_ms": median_ms(lambda: pbs_attention(lq, lk, lv, config)),
                    "sdpa_ms": median_ms(
                        lambda: F.scaled_dot_product_attention(lq, lk, lv, is_causal=True, scale=scale, enable_gqa=True)
                    ),
                }
                row["attend_vs_ideal"] = row["attend_ms"] / (row["density"] * row["sdpa_ms"])
                rows.append(row)
            del plan
    print("| workload | max_density | layout | density | attend ms | PBS ms | SDPA ms | attend / ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['max_density']} | {r['layout']} | {r['density']:.4f} | {r['attend_ms']:.2f} "
              f"| {r['pbs_ms']:.2f} | {r['sdpa_ms']:.1f} | {r['attend_vs_ideal']:.2f} |")
    device = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length}
    Path(args.out).write_text(json.dumps({**device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
