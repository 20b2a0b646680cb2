"""End-to-end prefill (time to first token): a Llama-3.1-8B-shaped model, `sdpa` vs `flex_pbs`.

Random weights give near-uniform attention, where a threshold keeps almost every block; the
sparse runs therefore cap density with ``PBSConfig.max_density`` (a per-row block budget) and
every speedup is printed next to the density measured on that run. Weights are bf16 and live
on the GPU; only the last position's logits are computed (as in generation).

    python benchmarks/bench_prefill.py --lengths 32768 65536 131072 --layers 2
    torchrun --nproc-per-node 2 benchmarks/bench_prefill.py --tp 2 --layers 32 ...   # several GPUs

With ``--tp N`` (under ``torchrun``, N processes) the model's heads are sharded over N GPUs by
transformers' tensor parallelism; its random weights are saved once to the temporary directory
and loaded sharded. Rank 0 prints and writes; memory is the largest peak of any GPU.

Writes ``--out`` (JSON) and prints a table. Needs CUDA; no Hydra. ``--profile`` instead runs one
prefill per method under ``torch.profiler`` at the first length (first max density and variant)
and prints and writes (``--out``) the GPU time per kernel, to see where the time between the
attention benchmark and end-to-end prefill goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flex_pbs  # noqa: E402
from flex_pbs import PBSConfig  # noqa: E402
from flex_pbs.integrations.tensor_parallel import check_heads, load_sharded, model_heads, rank  # noqa: E402
from flex_pbs.runner.models import llama_8b_config  # noqa: E402


def build_model(layers: int, tp: int):
    from transformers import AutoModelForCausalLM

    def build(device: str = "cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(llama_8b_config(layers), dtype=torch.bfloat16)

    if tp == 1:
        return build("cuda").eval()
    checkpoint = Path(tempfile.gettempdir()) / "flex_pbs_random_models" / f"llama8b-{layers}-seed0-bfloat16"
    return load_sharded(build, checkpoint, tp, "cuda", dtype=torch.bfloat16)


def device() -> torch.device:
    """This rank's GPU."""
    return torch.device("cuda", torch.cuda.current_device())


def random_ids(model, length: int) -> torch.Tensor:
    """The same tokens on every rank."""
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device())


def peak_gib_all_ranks() -> float:
    """The largest peak allocation of any rank's GPU since the last reset, in GiB."""
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak) / 2**30


def prefill_ms(model, ids: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            model(ids, logits_to_keep=1, use_cache=False)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def check_exact(model, length: int = 4096) -> float:
    """flex_pbs at threshold 1.0 reproduces sdpa's last-token logits (bf16 tolerance)."""
    ids = random_ids(model, length)
    flex_pbs.register(PBSConfig(threshold=1.0), overwrite=True)
    outs = {}
    for impl in ("sdpa", "flex_pbs"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(ids, logits_to_keep=1, use_cache=False).logits.float()
    return float((outs["flex_pbs"] - outs["sdpa"]).norm() / outs["sdpa"].norm())


def pbs_config(threshold: float, cap: float, variant: str) -> PBSConfig:
    """The engine config of one sparse row; ``variant`` is
    ``stride:precision[:peak_weight[:key_block_size]]`` (the default config's values when left
    out; a key block size ``k`` comes with a 512-token local window of ``512 // k`` blocks, as
    in the presets: ``8:fp8:0:128`` is ``pbs_fast``)."""
    stride, precision, *rest = variant.split(":")
    extra = {"peak_weight": float(rest[0])} if rest else {}
    if len(rest) > 1:
        extra.update(key_block_size=int(rest[1]), force_local_blocks=512 // int(rest[1]))
    return PBSConfig(threshold=threshold, max_density=cap, stride=int(stride), scoring_fp8=precision == "fp8", **extra)


def kernel_times(model, ids: torch.Tensor) -> list[dict[str, float | str | int]]:
    """GPU time per kernel name of one (warmed-up) prefill, largest first."""
    from torch.profiler import ProfilerActivity, profile

    prefill_ms(model, ids, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill_ms(model, ids, 1)
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals.setdefault(event.name, []).append(event.device_time / 1e3)
    rows = [{"kernel": name, "ms": sum(t), "calls": len(t)} for name, t in totals.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def profile_methods(model, args) -> dict[str, list[dict[str, float | str | int]]]:
    """Per-kernel GPU time of sdpa and of one flex_pbs row at the first length."""
    ids = random_ids(model, args.lengths[0])
    flex_pbs.register(pbs_config(args.threshold, args.max_densities[0], args.variants[0]), overwrite=True)
    tables = {}
    for impl in ("sdpa", "flex_pbs"):
        model.set_attn_implementation(impl)
        tables[impl] = kernel_times(model, ids)
        total = sum(row["ms"] for row in tables[impl])
        print(f"\n{impl}: {total:.1f} ms of GPU kernels\n| ms | calls | kernel |\n|---|---|---|")
        for row in tables[impl][:25]:
            print(f"| {row['ms']:.2f} | {row['calls']} | {row['kernel'][:110]} |")
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-densities", type=float, nargs="+", default=[0.1, 0.15])
    parser.add_argument("--variants", nargs="+", default=["8:bf16", "16:fp8"],
                        help="scoring variants stride:precision[:peak_weight[:key_block_size]] (precision bf16 or fp8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_prefill.json")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU time instead of the table")
    parser.add_argument("--tp", type=int, default=1, help="shard the heads over this many GPUs (under torchrun)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA device")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp != launched:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} processes: torchrun --nproc-per-node {args.tp} "
                         f"benchmarks/bench_prefill.py --tp {args.tp} ... (this run has {launched})")
    check_heads(*model_heads(llama_8b_config()), args.tp)
    import transformers
    import triton

    model = build_model(args.layers, args.tp)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
              "gpus": args.tp, "threshold_one_rel_error": check_exact(model), "rows": []}
    say = print if rank() == 0 else (lambda *a, **k: None)
    if args.profile:
        report["kernels"] = profile_methods(model, args)
        if rank() == 0:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return
    say(f"threshold 1.0 vs sdpa, last-token logits rel. error: {report['threshold_one_rel_error']:.2e}", flush=True)
    for length in args.lengths:
        ids = random_ids(model, length)
        model.set_attn_implementation("sdpa")
        prefill_ms(model, ids, 1)
        torch.cuda.reset_peak_memory_stats()
        sdpa = statistics.median(prefill_ms(model, ids, args.repeats))
        report["rows"].append({"L": length, "method": "sdpa", "ms": sdpa, "speedup": 1.0, "density": 1.0,
                               "peak_gib_per_gpu": peak_gib_all_ranks()})
        for cap, variant in [(c, v) for c in args.max_densities for v in args.variants]:
            config = pbs_config(args.threshold, cap, variant)
            flex_pbs.register(config, overwrite=True)
            model.set_attn_implementation("flex_pbs")
            start = time.perf_counter()
            prefill_ms(model, ids, 1)
            compile_s = time.perf_counter() - start
            torch.cuda.reset_peak_memory_stats()
            ms = statistics.median(prefill_ms(model, ids, args.repeats))
            peak = peak_gib_all_ranks()
            # Density from one more prefill with statistics on: collecting them is not part of
            # the time to first token.
            flex_pbs.register(config, collect_stats=True, overwrite=True)
            model.set_attn_implementation("flex_pbs")
            prefill_ms(model, ids, 1)
            stats = flex_pbs.stats(model)
            density = sum(float(s.density.mean()) for s in stats.values()) / len(stats)
            precision = "fp8" if config.scoring_fp8 else "bf16"
            row = {"L": length, "method": f"flex_pbs thr={args.threshold} max_density={cap} stride={config.stride} {precision} peak={config.peak_weight} key_block={config.key_block_size or config.block_size}",
                   "ms": ms, "speedup": sdpa / ms, "density": density, "first_call_s": compile_s,
                   "peak_gib_per_gpu": peak}
            report["rows"].append(row)
            say(row, flush=True)
        del ids
        torch.cuda.empty_cache()
    say(f"| L | method | ms | speedup vs sdpa | density | peak GiB per GPU ({args.tp} GPUs) |")
    say("|---|---|---|---|---|---|")
    for row in report["rows"]:
        say(f"| {row['L']} | {row['method']} | {row['ms']:.1f} | {row['speedup']:.2f} | {row['density']:.3f} "
            f"| {row['peak_gib_per_gpu']:.2f} |")
    if rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
