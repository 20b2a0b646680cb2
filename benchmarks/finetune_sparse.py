"""Fine-tune with PBS attention: does training with the sparse mask close its perplexity gap?

The bundled SmolLM2-135M-Instruct (CPU, fp32) is trained for ``--steps`` steps on windows of
Python standard-library source with flex_pbs attention at a low density (``--max-density``, a
per-row block budget), and evaluated every ``--eval-every`` steps on held-out windows of the
same text (the first tokens; training starts ``--train-offset`` tokens in) with dense attention
and with PBS at the same density. The gap is the sparse perplexity over the dense one, of the
same weights; it shrinks when the model learns to live with the mask. The plan (which blocks)
gets no gradient; attention over the chosen keys does.

    python benchmarks/finetune_sparse.py --steps 150 --out finetune_sparse.json

Prints a table and writes ``--out`` (JSON). ``--model tiny`` runs a random 2-layer model (for
tests).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flex_pbs  # noqa: E402
from flex_pbs import PBSConfig  # noqa: E402


def load(model: str):
    """``(model, token ids of the text [1, N])``."""
    if model == "tiny":
        from flex_pbs.runner.models import random_model, tiny_config

        ids = torch.randint(0, 1024, (1, 40_000), generator=torch.Generator().manual_seed(0))
        return random_model(tiny_config("llama"), "sdpa", seed=0), ids
    from flex_pbs.runner.data import token_ids
    from flex_pbs.runner.models import load_smollm2

    net, tokenizer = load_smollm2()
    return net, token_ids(tokenizer, "code", 120_000)


def windows(ids: torch.Tensor, seq_len: int, start: int, count: int) -> list[torch.Tensor]:
    """``count`` consecutive windows of ``seq_len`` tokens from ``start``."""
    return [ids[:, start + i * seq_len : start + (i + 1) * seq_len] for i in range(count)]


def evaluate(model, held_out: list[torch.Tensor], attention: str) -> tuple[float, float | None]:
    """``(perplexity, mean density)`` over the held-out windows."""
    model.eval()
    model.set_attn_implementation(attention)
    losses, densities = [], []
    with torch.no_grad():
        for window in held_out:
            losses.append(float(model(window, labels=window, use_cache=False).loss))
            if attention == "flex_pbs":
                stats = flex_pbs.stats(model)
                densities.append(sum(float(s.density.mean()) for s in stats.values()) / len(stats))
    density = sum(densities) / len(densities) if densities else None
    return math.exp(sum(losses) / len(losses)), density


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-density", type=float, default=0.15, help="PBSConfig.max_density while training")
    parser.add_argument("--force-local-blocks", type=int, default=0, help="PBSConfig.force_local_blocks")
    parser.add_argument("--segment-size", type=int, default=128, help="PBSConfig.segment_size (the diagonal segment)")
    parser.add_argument("--permute", choices=["none", "auto", "key"], default="none", help="PBSConfig.permute")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=2, help="held-out windows (the text's first tokens)")
    parser.add_argument("--train-offset", type=int, default=16384, help="first training token")
    parser.add_argument("--out", default="finetune_sparse.json")
    args = parser.parse_args(argv)

    model, ids = load(args.model)
    config = PBSConfig(max_density=args.max_density, force_local_blocks=args.force_local_blocks,
                       segment_size=args.segment_size, permute=args.permute)
    flex_pbs.register(config, collect_stats=True, overwrite=True)
    held_out = windows(ids, args.seq_len, 0, args.eval_windows)
    available = (ids.shape[1] - args.train_offset) // args.seq_len
    if args.train_offset < args.eval_windows * args.seq_len or available < 1:
        raise SystemExit("the held-out windows and the training windows overlap, or no training window fits")
    train = windows(ids, args.seq_len, args.train_offset, available)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rows = []

    def record(step: int, train_loss: float | None, seconds: float) -> None:
        dense, _ = evaluate(model, held_out, "sdpa")
        sparse, density = evaluate(model, held_out, "flex_pbs")
        rows.append({"step": step, "train_loss": train_loss, "dense_ppl": dense, "sparse_ppl": sparse,
                     "gap_pct": 100 * (sparse / dense - 1), "density": density, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

    start = time.perf_counter()
    record(0, None, 0.0)
    for step in range(1, args.steps + 1):
        model.train()
        model.set_attn_implementation("flex_pbs")
        window = train[(step - 1) % len(train)]
        optimizer.zero_grad()
        loss = model(window, labels=window, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            record(step, loss.item(), time.perf_counter() - start)
    report = {"args": vars(args), "config": str(config), "torch": torch.__version__, "rows": rows,
              "gap_shrank": rows[-1]["gap_pct"] < rows[0]["gap_pct"]}
    print("| step | dense ppl | sparse ppl | gap (%) | density |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['dense_ppl']:.3f} | {row['sparse_ppl']:.3f} | {row['gap_pct']:+.2f} | {row['density']:.3f} |")
    Path(args.out).write_text(json.dumps(report, indent=1))
    flex_pbs.unregister()
    return report


if __name__ == "__main__":
    main()
