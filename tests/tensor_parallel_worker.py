"""Run under ``torch.distributed.run`` by tests/test_tensor_parallel.py: one model sharded with
transformers' tensor parallelism and flex_pbs attention, against the same model in one process.
Rank 0 writes the comparisons as JSON.

    python -m torch.distributed.run --nproc-per-node 2 tests/tensor_parallel_worker.py tiny OUT.json CHECKPOINT_DIR
    python -m torch.distributed.run --nproc-per-node 3 tests/tensor_parallel_worker.py smollm2 OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import flex_pbs
from flex_pbs import PBSConfig
from flex_pbs.integrations.tensor_parallel import (
    load_sharded,
    rank,
    tensor_parallel_size,
)


def models(kind: str, checkpoint: str | None):
    """``(tensor-parallel model, one-process model, token ids [1, L], pad id)``."""
    from transformers import AutoModelForCausalLM

    if kind == "tiny":
        from flex_pbs.runner.models import random_model, tiny_config

        size = dist.get_world_size() if dist.is_initialized() else int(__import__("os").environ["WORLD_SIZE"])
        sharded = load_sharded(lambda: random_model(tiny_config("llama"), seed=0), Path(checkpoint), size, "cpu",
                               dtype=torch.float32)
        single = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        ids = torch.randint(3, 1024, (1, 700), generator=torch.Generator().manual_seed(0))
        return sharded, single, ids, 0
    from flex_pbs.runner.data import token_ids
    from flex_pbs.runner.models import load_smollm2

    size = int(__import__("os").environ["WORLD_SIZE"])
    sharded, tokenizer = load_smollm2(tensor_parallel=size)
    single, _ = load_smollm2()
    return sharded, single, token_ids(tokenizer, "code", 700), tokenizer.pad_token_id or 0


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def with_attention(model, name: str):
    model.set_attn_implementation(name)
    return model


def stats_of(model) -> dict[str, list]:
    """Per layer: density per query head, and the share of each KV head's keys permuted."""
    return {str(layer): [s.density.tolist(), None if s.permuted is None else s.permuted.tolist()]
            for layer, s in flex_pbs.stats(model).items()}


def main() -> None:
    kind, out = sys.argv[1], sys.argv[2]
    checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
    sharded, single, ids, pad = models(kind, checkpoint)
    report: dict = {"tp_size": tensor_parallel_size(sharded), "world_size": dist.get_world_size()}
    sparse = PBSConfig(threshold=0.9, force_local_blocks=0, segment_size=128)  # 700 tokens: sparse only so

    # Threshold 1.0 under TP equals one-process SDPA.
    flex_pbs.register(PBSConfig(threshold=1.0), overwrite=True)
    reference = logits(with_attention(single, "sdpa"), ids)
    report["exact_vs_sdpa"] = rel(logits(flex_pbs.apply(sharded), ids), reference)

    # Threshold 0.9: logits and per-layer, per-head stats equal one-process flex_pbs.
    flex_pbs.register(sparse, collect_stats=True, overwrite=True)
    report["sparse_vs_single"] = rel(logits(sharded, ids), logits(flex_pbs.apply(single), ids))
    report["stats_sharded"], report["stats_single"] = stats_of(sharded), stats_of(single)

    # Per-layer thresholds and dense layers.
    flex_pbs.register(sparse, dense_layers=[0], layer_thresholds={1: 0.5}, collect_stats=True, overwrite=True)
    report["layers_vs_single"] = rel(logits(sharded, ids), logits(single, ids))
    report["layers_stats_sharded"], report["layers_stats_single"] = stats_of(sharded), stats_of(single)

    # A left-padded batch (real tokens only) and chunked prefill over a cache.
    flex_pbs.register(sparse, overwrite=True)
    batch = torch.full((2, 700), pad, dtype=torch.long)
    batch[0], batch[1, 150:] = ids[0], ids[0, :550]
    attention_mask = (torch.arange(700) >= torch.tensor([[0], [150]])).long()
    padded = [logits(model, batch, attention_mask=attention_mask) for model in (sharded, single)]
    report["padded_vs_single"] = rel(padded[0][attention_mask.bool()], padded[1][attention_mask.bool()])
    chunked = []
    for model in (sharded, single):
        with torch.no_grad():
            first = model(ids[:, :500], use_cache=True)
            chunked.append(model(ids[:, 500:], past_key_values=first.past_key_values, use_cache=True).logits.float())
    report["chunked_vs_single"] = rel(chunked[0], chunked[1])

    # Generation with a cache: 20 greedy tokens.
    generated = []
    for model in (sharded, single):
        with torch.no_grad():
            generated.append(model.generate(ids[:, :600], max_new_tokens=20, do_sample=False,
                                             pad_token_id=pad)[0, 600:].tolist())
    report["generated_sharded"], report["generated_single"] = generated

    if rank() == 0:
        Path(out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
