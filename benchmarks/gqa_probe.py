"""Is the sparse attend bound by reading K/V, and would GQA-shared selections fix that?

At low density every query tile reads its own few K/V blocks (64 KiB each at head_dim 128):
at 128K and density 0.05 that is ~55 GB per layer, ~17 ms of HBM traffic, about the attend time
measured on near-uniform inputs. FlexAttention's grid is head-major, so the 4 query heads of a
GQA group never run together and cannot share K/V reads through L2. This times, on one plan:

* ``per_head``: the shipped attend (each query head its own selection);
* ``shared``: one selection per KV head (group mean of the block scores), heads in the usual order;
* ``shared_interleaved``: the same selection with the group's heads moved into the query axis,
  tile ``(query block, head)`` adjacent, so the 4 tiles reading the same blocks run together;
* ``per_head_interleaved``: per-head selections in that layout (the layout change alone);

plus the cost of moving Q into and the output out of the interleaved layout, and checks that the
interleaved runs equal their plain counterparts.

    python benchmarks/gqa_probe.py [--length 131072] [--out gqa_probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flex_pbs import PBSConfig, build_plan  # noqa: E402
from flex_pbs.engine.pipeline import select_stage  # noqa: E402
from flex_pbs.engine.attend import HOPPER_D128_OPTIONS, compiled_flex_attention  # noqa: E402
from flex_pbs.engine.mask import _SKIP_Q_BLOCKS, build_flex_mask  # noqa: E402
from flex_pbs.analysis.synthetic import planted_qkv  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
GROUP = Q_HEADS // KV_HEADS


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv·G, nQ, ...]`` -> ``[B, Hkv, nQ·G, ...]`` with row ``(query block, head)``; a
    per-KV-head ``[B, Hkv, nQ, ...]`` is repeated for the G heads."""
    b, _, n_q = t.shape[:3]
    if t.shape[1] == KV_HEADS:
        return t.repeat_interleave(GROUP, dim=2)
    return t.reshape(b, KV_HEADS, GROUP, n_q, *t.shape[3:]).transpose(2, 3).reshape(b, KV_HEADS, n_q * GROUP, *t.shape[3:])


def interleave_q(q: torch.Tensor) -> torch.Tensor:
    """``q [B, Hq, L, D]`` -> ``[B, Hkv, nQ·G·BLOCK, D]``: block ``(qb, g)`` holds head g's block qb."""
    b, _, length, dim = q.shape
    blocks = q.reshape(b, KV_HEADS, GROUP, length // BLOCK, BLOCK, dim).transpose(2, 3)
    return blocks.reshape(b, KV_HEADS, GROUP * length, dim)


def deinterleave_out(out: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`interleave_q`, straight into the model's ``[B, L, Hq, D]`` layout."""
    b, _, _, dim = out.shape
    blocks = out.reshape(b, KV_HEADS, length // BLOCK, GROUP, BLOCK, dim)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(b, length, Q_HEADS, dim)


def interleaved_mask(indices, length: int) -> BlockMask:
    """BlockMask over the interleaved query axis; partial blocks token-causal."""
    kv_num, kv_idx, full_num, full_idx = (interleave_rows(t).contiguous() for t in indices)

    def causal(b, h, q_idx, kv_idx):
        position = (q_idx // (GROUP * BLOCK)) * BLOCK + q_idx % BLOCK
        return kv_idx <= position

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal,
        seq_lengths=(GROUP * length, length), **_SKIP_Q_BLOCKS,
    )


def mask_indices(mask: BlockMask):
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--out", default="gqa_probe.json")
    args = parser.parse_args(argv)
    length, scale = args.length, HEAD_DIM**-0.5
    attend = compiled_flex_attention("cuda")
    options = dict(HOPPER_D128_OPTIONS)
    rows = []
    for workload in ("random", "planted"):
        if workload == "planted":
            q, k, v = planted_qkv(1, Q_HEADS, KV_HEADS, length, HEAD_DIM, seed=0, dtype=torch.bfloat16, device="cuda")
        else:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, h, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for h in (Q_HEADS, KV_HEADS, KV_HEADS))
        sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        q_inter = interleave_q(q)
        for cap in args.densities:
            config = PBSConfig(max_density=cap, scoring_fp8=True)
            plan = build_plan(q, k, config)
            group_scores = plan.block_scores.reshape(1, KV_HEADS, GROUP, *plan.block_scores.shape[2:]).mean(2)
            shared_selected, shared_idx = select_stage(group_scores, plan.key_order, plan.layout, config)
            shared_idx_q = tuple(t.repeat_interleave(GROUP, dim=1) for t in shared_idx)
            masks = {
                "per_head": (plan.flex_mask, q, True),
                "shared": (build_flex_mask(shared_idx_q, None, plan.layout), q, True),
                "per_head_interleaved": (interleaved_mask(mask_indices(plan.flex_mask), length), q_inter, False),
                "shared_interleaved": (interleaved_mask(shared_idx, length), q_inter, False),
            }
            outs = {}
            for name, (mask, q_in, gqa) in masks.items():
                def run(mask=mask, q_in=q_in, gqa=gqa):
                    return attend(q_in, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, kernel_options=options)

                outs[name] = run()
                row = {"workload": workload, "max_density": cap, "variant": name, "sdpa_ms": sdpa_ms,
                       "density": plan.density if name.startswith("per_head") else float(shared_selected.float().mean() / plan.causal_blocks.float().mean()),
                       "attend_ms": median_ms(run)}
                row["attend_vs_ideal"] = row["attend_ms"] / (row["density"] * sdpa_ms)
                rows.append(row)
                print(row, flush=True)
            for plain, inter in (("per_head", "per_head_interleaved"), ("shared", "shared_interleaved")):
                back = deinterleave_out(outs[inter], length).transpose(1, 2)
                print(f"{workload} {cap} max|{inter} - {plain}| =", float((back - outs[plain]).abs().max()), flush=True)
            rows.append({"workload": workload, "max_density": cap, "variant": "layout_copies",
                         "interleave_q_ms": median_ms(lambda: interleave_q(q).contiguous()),
                         "deinterleave_out_ms": median_ms(lambda: deinterleave_out(outs["shared_interleaved"], length).contiguous()),
                         "transpose_out_ms": median_ms(lambda: outs["shared"].transpose(1, 2).contiguous())})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
