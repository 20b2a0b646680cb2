"""Query permutation, a quality lever: reorder the *queries* inside segments before block selection.

Block-sparse attention decides per (query block, key block) whether to compute. Attention is
exact per query, so permuting the queries inside a segment (and restoring the output order) is
lossless when dense; it only changes which queries share a block, hence which blocks the
threshold selects. The hope: queries that need the same far key blocks land in one query block,
so each block row reaches the score threshold with fewer blocks.

This script runs SmolLM2-135M (the runner's model, texts and perplexity functions) with an
attention function of its own, registered through transformers' ``AttentionInterface``. Per
layer and query head it:

1. permutes the keys as the engine does (``permute="key"``: importance to the last query block,
   sorted inside segments) or not at all;
2. orders the queries inside each segment by a criterion (below), per query head;
3. scores blocks with the engine's antidiagonal estimate on the permuted queries (each strided
   query row's causal limit is the largest original position among its queries), and selects
   them with the engine's own forced blocks (diagonal segment, sink, local window) and
   threshold selection (``flex_pbs.engine.select``); a block is causal when its earliest key
   precedes its latest query;
4. attends exactly: dense SDPA with the token mask "selected block ∧ key position <= query
   position" (original positions), then scatters the output back to the original query order.

Density is the engine's: computed causal blocks / causal blocks, mean over heads, then layers.
``cost`` is computed blocks / the causal blocks of the unpermuted problem: permuting queries (or
keys) makes all four blocks of a 256-token diagonal segment causal, which raises both the
computed and the causal count.

Criteria (estimated per query from its attention to every ``stride``-th key slot, the forced
blocks of its segment excluded, since they are computed anyway):

* ``far_mass``: queries with the least estimated attention outside the forced blocks first.
  Selection counts the forced blocks' mass toward the threshold, so a block of "local" queries
  can stop at its forced blocks while the far-looking queries share the other blocks.
* ``favourite``: queries sorted by the index of the non-forced key block they attend to most
  (ties: by far mass), so that queries wanting the same far block share a query block.

Lines (``--lines``) are ``<base>/<order>``: base ``pbs`` (``pbs_fast``, the default when this
ran: square 128-token blocks, segment 128), ``seg256`` and ``seg512`` (no key permutation,
local window 4), ``seg256_local0`` (no local window), ``key256`` (key permutation, segment
256, local window 4); order ``engine`` (the engine itself,
through the method registry), ``identity`` (this script's path, queries unpermuted) or a
criterion. ``--sanity TEXT...`` first checks, on those texts, that the scorer matches the
engine's, that threshold 1.0 (key and query permutation) reproduces dense perplexity and that
``identity`` reproduces the engine at threshold 0.9, without and with key permutation.

Writes ``<text>_<length>.csv`` (one row per run, readable by ``quality_at_density.py``),
``results.json`` and ``summary.md`` under ``benchmarks/quality/segment128/levers/query_permutation/``.
Rows already in a CSV are reused, so several invocations add up (delete a CSV to re-measure), and
an invocation's ``results.json`` and ``summary.md`` hold every row of the CSVs of its texts.

Reproduce the committed results (8K, 2 CPU threads; about 20 s per engine pass and 90 s per pass
of this path on an idle machine, about 75 minutes in all; the last command summarises)::

    Q="benchmarks/query_permutation.py --lengths 8192"
    .venv/bin/python $Q --texts code --sanity code --lines seg256/far_mass seg256/favourite --thresholds 0.9
    .venv/bin/python $Q --texts code --lines key256/engine key256/favourite
    .venv/bin/python $Q --texts code --lines seg256_local0/engine seg256_local0/favourite --thresholds 0.9 0.95
    .venv/bin/python $Q --texts code prose --sanity code --lines seg256/favourite pbs/engine seg256/engine
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import flex_pbs
from flex_pbs import PBSConfig
from flex_pbs.runner.data import TEXTS, token_ids
from flex_pbs.engine.layout import BlockLayout, block_min_position
from flex_pbs.engine.methods import method_config
from flex_pbs.engine.permute import identity_key_order, key_importance, permute_keys, segment_key_order
from flex_pbs.runner.measure import perplexity, stats_summary, timed_forward, token_losses
from flex_pbs.runner.session import (
    Session, attention, experimental_attention, smollm2_session, whole_prefill_scale,
)
from flex_pbs.runner.tasks import relative_change_pct
from flex_pbs.engine.score import antidiagonal_block_scores
from flex_pbs.engine.select import forced_blocks, select_blocks

sys.path.insert(0, str(Path(__file__).parent))
from quality_at_density import interpolate  # noqa: E402

OUT = Path(__file__).parent / "quality/segment128/levers/query_permutation"
ATTENTION_NAME = "flex_pbs_query_permutation"
TAIL_TOKENS = 1024
CRITERIA = ("far_mass", "favourite")
ORDERS = ("engine", "identity", *CRITERIA)
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "pbs": ("pbs_fast", {}),
    "seg256": ("pbs_fast", {"segment_size": 256}),
    "seg256_local0": ("pbs_fast", {"segment_size": 256, "force_local_blocks": 0}),
    "seg512": ("pbs_fast", {"segment_size": 512}),
    "key256": ("pbs_antidiagonal", {"force_local_blocks": 4}),
}
# Queries whose estimate is computed at once (bounds memory to Hq * chunk * L / stride floats).
ESTIMATE_QUERY_CHUNK = 1024


@dataclass(frozen=True)
class Line:
    """One curve: an engine config and who orders the queries (``engine``: the engine itself)."""

    name: str
    method: str
    overrides: dict[str, Any]
    order: str

    def engine(self, threshold: float) -> PBSConfig:
        return method_config(self.method, **self.overrides, threshold=threshold)


def parse_line(name: str) -> Line:
    """``"<base>/<order>"`` -> :class:`Line`."""
    base, _, order = name.partition("/")
    if base not in BASES or order not in ORDERS:
        raise argparse.ArgumentTypeError(
            f"line {name!r}: expected <base>/<order>, base in {sorted(BASES)}, order in {ORDERS}"
        )
    method, overrides = BASES[base]
    return Line(name, method, overrides, order)


# ------------------------------------------------------------------------------ the planning


def block_causal(query_order: torch.Tensor, key_order: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks holding a key visible to some query of the block: bool ``[B, Hq, nQ, nK]``.

    Args:
        query_order: long ``[B, Hq, L]``, original position of each query slot.
        key_order: long ``[B, Hkv, L]``, original position of each key slot.
    """
    batch, q_heads, length = query_order.shape
    last_query = query_order.reshape(batch, q_heads, length // block_size, block_size).amax(-1)
    first_key = block_min_position(key_order, block_size).repeat_interleave(q_heads // key_order.shape[1], dim=1)
    return first_key[:, :, None, :] <= last_query[..., None]


def antidiagonal_scores(
    q_perm: torch.Tensor,
    k_perm: torch.Tensor,
    query_order: torch.Tensor,
    key_order: torch.Tensor,
    layout: BlockLayout,
    stride: int,
    scale: float,
    chunk_blocks: int = 16,
) -> torch.Tensor:
    """The engine's antidiagonal estimate (``flex_pbs.engine.score.antidiagonal_block_scores``) on
    permuted queries: a strided row sees a key slot when the slot's earliest key precedes the
    row's latest query. Equal to the engine's for the identity query order.

    Args:
        q_perm: ``[B, Hq, L, D]`` in the permuted query layout; k_perm: ``[B, Hkv, L, D]``.
        query_order: long ``[B, Hq, L]``; key_order: long ``[B, Hkv, L]``.

    Returns:
        float32 ``[B, Hq, nQ, nK]``.
    """
    batch, q_heads, length, dim = q_perm.shape
    kv_heads = k_perm.shape[1]
    group = q_heads // kv_heads
    bs, n_q, n_k = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    rows_per_block = bs // stride
    q_rows = q_perm.reshape(batch, kv_heads, group, n_q * rows_per_block, stride, dim).flip(-2).flatten(-2)
    k_slots = k_perm.reshape(batch, kv_heads, n_k * rows_per_block, stride * dim).transpose(-1, -2)
    slot_first = block_min_position(key_order, bs, stride)[:, :, None, None, :]
    row_last = query_order.reshape(batch, kv_heads, group, n_q * rows_per_block, stride).amax(-1)
    scores = []
    for blocks in torch.arange(n_q).split(chunk_blocks):
        rows = (blocks[:, None] * rows_per_block + torch.arange(rows_per_block)).flatten()
        logits = torch.matmul(q_rows[:, :, :, rows], k_slots[:, :, None]).float() * (scale / stride)
        visible = slot_first <= row_last[:, :, :, rows, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        tiles = probs.view(batch, kv_heads, group, blocks.numel(), rows_per_block, n_k, rows_per_block)
        scores.append(tiles.sum(dim=(-3, -1)))
    return torch.cat(scores, dim=3).reshape(batch, q_heads, n_q, n_k)


def far_block_mass(
    q: torch.Tensor, k_perm: torch.Tensor, key_order: torch.Tensor, forced: torch.Tensor, stride: int, scale: float
) -> torch.Tensor:
    """Each query's estimated attention to each key block outside its forced blocks.

    The softmax runs over every ``stride``-th key slot (token-causal on original positions);
    the mass of each block is the sum over its sampled slots, then zeroed on forced blocks.

    Args:
        q: ``[B, Hq, L, D]`` in original order; k_perm: ``[B, Hkv, L, D]``.
        key_order: long ``[B, Hkv, L]``.
        forced: bool ``[B, Hkv, nQ, nK]``, the blocks each query-block row computes anyway.

    Returns:
        float32 ``[B, Hq, L, nK]``.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, n_k = k_perm.shape[1], forced.shape[-1]
    group, block_size = q_heads // kv_heads, length // n_k
    sampled = k_perm[:, :, ::stride].transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, L/S]
    sampled_pos = key_order[:, :, None, None, ::stride]
    masses = []
    for start in range(0, length, ESTIMATE_QUERY_CHUNK):
        positions = torch.arange(start, min(start + ESTIMATE_QUERY_CHUNK, length))
        chunk = q[:, :, positions].reshape(batch, kv_heads, group, positions.numel(), dim)
        logits = torch.matmul(chunk, sampled).float() * scale
        probs = torch.softmax(logits.masked_fill(sampled_pos > positions[:, None], float("-inf")), dim=-1)
        mass = probs.nan_to_num(0.0).unflatten(-1, (n_k, block_size // stride)).sum(-1)
        masses.append(mass.masked_fill(forced[:, :, None, positions // block_size], 0.0))
    return torch.cat(masses, dim=3).reshape(batch, q_heads, length, n_k)


def query_order_of(
    criterion: str,
    q: torch.Tensor,
    k_perm: torch.Tensor,
    key_order: torch.Tensor,
    forced: torch.Tensor,
    config: PBSConfig,
    scale: float,
) -> torch.Tensor:
    """Original position of each query slot after sorting inside segments: long ``[B, Hq, L]``.

    ``segment_key_order`` sorts by descending value, stably, inside every segment.
    """
    batch, q_heads, length, _ = q.shape
    if criterion == "identity":
        return torch.arange(length).expand(batch, q_heads, length).clone()
    mass = far_block_mass(q, k_perm, key_order, forced, config.stride, scale)
    far = mass.sum(-1)
    if criterion == "far_mass":
        value = -far
    elif criterion == "favourite":
        value = mass.argmax(-1).float() + far
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {('identity', *CRITERIA)}")
    return segment_key_order(value, config.segment_size)


@dataclass
class LayerPlan:
    """What one layer computed: per query head, computed causal blocks and causal blocks, and
    the causal blocks the unpermuted problem has (``float [Hq]`` each, batch summed)."""

    computed: torch.Tensor
    causal: torch.Tensor
    unpermuted_causal: torch.Tensor


def permuted_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig, criterion: str, scale: float
) -> tuple[torch.Tensor, LayerPlan]:
    """Block-sparse causal attention with queries (and, per ``config``, keys) permuted inside
    segments, computed exactly with a token mask.

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, L, D]``; L a multiple of the block size.

    Returns:
        ``([B, Hq, L, D]`` in the original query order, the layer's block counts).
    """
    length, group, bs = q.shape[2], q.shape[1] // k.shape[1], config.block_size
    layout = BlockLayout(length, length, 0, bs, config.segment_size)
    if config.permute == "key":
        key_order = segment_key_order(key_importance(q, k, bs, scale), config.segment_size)
        k_perm, v_perm = permute_keys(k, key_order), permute_keys(v, key_order)
    else:
        key_order, k_perm, v_perm = identity_key_order(k), k, v
    forced = forced_blocks(key_order, layout, config).expand(*k.shape[:2], layout.num_q_blocks, layout.num_kv_blocks)
    query_order = query_order_of(criterion, q, k_perm, key_order, forced, config, scale)
    q_perm = torch.gather(q, 2, query_order[..., None].expand_as(q))

    causal = block_causal(query_order, key_order, bs)
    scores = antidiagonal_scores(
        q_perm, k_perm, query_order, key_order, layout, config.stride, scale, config.scoring_chunk
    )
    selected = select_blocks(
        scores, causal, forced.repeat_interleave(group, dim=1), config.threshold,
        config.max_density, config.threshold_counts_forced,
    )
    key_positions = key_order.repeat_interleave(group, dim=1)
    mask = selected.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
    mask &= key_positions[:, :, None, :] <= query_order[..., None]
    out_perm = F.scaled_dot_product_attention(q_perm, k_perm, v_perm, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    out = torch.empty_like(out_perm).scatter_(2, query_order[..., None].expand_as(out_perm), out_perm)
    unpermuted = layout.causal_blocks(identity_key_order(k)).sum(dim=(0, 2, 3)).repeat_interleave(group).float()
    counts = LayerPlan(selected.sum(dim=(0, 2, 3)).float(), causal.sum(dim=(0, 2, 3)).float(), unpermuted)
    return out, counts


@dataclass
class PermutedAttention:
    """The registered attention function: plans per layer with one config and criterion."""

    config: PBSConfig
    criterion: str
    plans: dict[int, LayerPlan] = dataclasses.field(default_factory=dict)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = whole_prefill_scale(attention_mask, query, self.config.block_size, scaling)
        out, self.plans[module.layer_idx] = permuted_attention(query, key, value, self.config, self.criterion, scale)
        return out.transpose(1, 2).contiguous(), None

    def density(self) -> tuple[float, float]:
        """``(density, cost)``: mean over layers of the mean over heads of computed / causal
        blocks, and of computed / the unpermuted problem's causal blocks."""
        plans = self.plans.values()
        density = torch.stack([(p.computed / p.causal).mean() for p in plans]).mean()
        cost = torch.stack([(p.computed / p.unpermuted_causal).mean() for p in plans]).mean()
        return float(density), float(cost)


# ---------------------------------------------------------------------------- the measurement


def evaluate(session: Session, ids: torch.Tensor, line: Line | None, threshold: float | None) -> dict[str, Any]:
    """One forward pass: perplexity, last-``TAIL_TOKENS`` perplexity, density, cost, wall time.
    ``line=None`` is dense SDPA."""
    cost = None
    if line is None:
        with attention(session, None):
            output, wall = timed_forward(session, ids)
        density = 1.0
    elif line.order == "engine":
        with attention(session, line.engine(threshold), collect_stats=True):
            output, wall = timed_forward(session, ids)
            density = stats_summary(flex_pbs.stats(session.model))["density"]
    else:
        function = PermutedAttention(line.engine(threshold), line.order)
        with experimental_attention(session, ATTENTION_NAME, function):
            output, wall = timed_forward(session, ids)
        density, cost = function.density()
    losses = token_losses(output.logits, ids)
    return {
        "line": "dense" if line is None else line.name,
        "method": "dense" if line is None else line.order,
        "threshold": threshold,
        "seq_len": ids.shape[1],
        "perplexity": perplexity(losses),
        "tail_perplexity": perplexity(losses[-TAIL_TOKENS:]),
        "density": density,
        "cost": cost,
        "wall_s": wall,
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows written by :meth:`Runs.write_csv` (empty cells -> None, numbers parsed)."""

    def parse(key: str, value: str) -> Any:
        if key in ("text", "line", "method"):
            return value
        return None if value == "" else int(value) if key == "seq_len" else float(value)

    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass
class Runs:
    """Rows of one text and length, each measured once (rows already in ``csv_path`` are
    reused: delete the file to measure again), deltas against the dense row."""

    session: Session
    text: str
    ids: torch.Tensor
    csv_path: Path
    rows: dict[tuple[str, float | None], dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = {(row["line"], row["threshold"]): row for row in read_rows(self.csv_path)}

    def get(self, line: Line | None, threshold: float | None) -> dict[str, Any]:
        key = ("dense" if line is None else line.name, threshold)
        if key not in self.rows:
            row = {"text": self.text, **evaluate(self.session, self.ids, line, threshold)}
            dense = self.rows[("dense", None)] if line is not None else row
            row["delta_pct"] = relative_change_pct(row["perplexity"], dense["perplexity"])
            row["tail_delta_pct"] = relative_change_pct(row["tail_perplexity"], dense["tail_perplexity"])
            self.rows[key] = row
            print(format_row(row), flush=True)
            self.write_csv()
        return self.rows[key]

    def write_csv(self) -> None:
        rows = list(self.rows.values())
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def format_row(row: dict[str, Any]) -> str:
    """A markdown table row: line, threshold, density, cost, Δppl %, Δ last-1K %, wall."""
    threshold = "-" if row["threshold"] is None else f"{row['threshold']:g}"
    cost = "-" if row["cost"] is None else f"{row['cost']:.4f}"
    return (
        f"| {row['text']} {row['seq_len']} | {row['line']} | {threshold} | {row['density']:.4f} | {cost} | "
        f"{row['perplexity']:.4f} | {row['delta_pct']:+.2f} | {row['tail_delta_pct']:+.2f} | {row['wall_s']:.0f} |"
    )


TABLE_HEADER = (
    "| text | line | threshold | density | cost | perplexity | Δppl % | Δ last 1K % | wall s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def scorer_check(seed: int = 0) -> float:
    """Max |Δ| between this script's scorer (identity query order) and the engine's, on
    random ``[1, 6, 1024, 64]`` queries and keys permuted inside 256-token segments."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 1024, 64, generator=generator)
    k = torch.randn(1, 2, 1024, 64, generator=generator)
    key_order = segment_key_order(torch.rand(1, 2, 1024, generator=generator), 256)
    k_perm = permute_keys(k, key_order)
    layout = BlockLayout(1024, 1024, 0, 128, 256)
    query_order = torch.arange(1024).expand(1, 6, 1024)
    ours = antidiagonal_scores(q, k_perm, query_order, key_order, layout, 8, 0.125)
    engine = antidiagonal_block_scores(q, k_perm, key_order, layout, 8, 0.125)
    return float((ours - engine).abs().max())


def sanity_checks(runs: Runs, criterion: str) -> dict[str, float]:
    """Threshold 1.0 with key and query permutation against dense; ``identity`` against the
    engine at threshold 0.9, without and with key permutation (relative perplexity error,
    absolute density error)."""
    def ratio_error(row: dict[str, Any], reference: dict[str, Any], key: str) -> float:
        return abs(row[key] / reference[key] - 1)

    dense = runs.get(None, None)
    full = runs.get(parse_line(f"key256/{criterion}"), 1.0)
    name = f"threshold 1.0, key256/{criterion}"
    checks = {
        f"{name}: |ppl / dense - 1|": ratio_error(full, dense, "perplexity"),
        f"{name}: |tail ppl / dense - 1|": ratio_error(full, dense, "tail_perplexity"),
        f"{name}: density": full["density"],
    }
    for base in ("seg256", "key256"):
        ours, engine = runs.get(parse_line(f"{base}/identity"), 0.9), runs.get(parse_line(f"{base}/engine"), 0.9)
        name = f"{base} identity vs engine, 0.9"
        checks[f"{name}: |ppl ratio - 1|"] = ratio_error(ours, engine, "perplexity")
        checks[f"{name}: |tail ppl ratio - 1|"] = ratio_error(ours, engine, "tail_perplexity")
        checks[f"{name}: |Δ density|"] = abs(ours["density"] - engine["density"])
    return checks


def matched_density(rows: list[dict[str, Any]], densities: list[float], by: str) -> list[dict[str, Any]]:
    """Each line's (Δppl, Δtail) interpolated linearly in ``by`` (``density`` or ``cost``) at
    ``densities`` (None outside the line's measured range), per text and length."""
    lines: dict[tuple, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row["line"] != "dense" and row["threshold"] < 1.0 and row[by] is not None:
            key = (row["text"], row["seq_len"], row["line"])
            lines.setdefault(key, []).append((row[by], row["delta_pct"], row["tail_delta_pct"]))
    result = []
    for (text, seq_len, line), points in lines.items():
        for density in densities:
            value = interpolate(sorted(points), density)
            result.append({
                "text": text, "seq_len": seq_len, "line": line, "by": by, "density": density,
                "delta_pct": None if value is None else value[0],
                "tail_delta_pct": None if value is None else value[1],
            })
    return result


def matched_table(matched: list[dict[str, Any]], densities: list[float]) -> str:
    """Markdown: one row per (text, length, line), ``Δppl / Δtail`` per density."""
    header = "| text | line | by | " + " | ".join(f"{d:g}" for d in densities) + " |"
    lines = [header, "|" + "---|" * (3 + len(densities))]
    cells: dict[tuple, dict[float, dict]] = {}
    for m in matched:
        cells.setdefault((m["text"], m["seq_len"], m["line"], m["by"]), {})[m["density"]] = m
    for (text, seq_len, line, by), at in cells.items():
        values = [
            "-" if at[d]["delta_pct"] is None else f"{at[d]['delta_pct']:+.2f} / {at[d]['tail_delta_pct']:+.2f}"
            for d in densities
        ]
        lines.append(f"| {text} {seq_len} | {line} | {by} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=TEXTS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--lines", type=parse_line, nargs="+", default=[parse_line("seg256/far_mass")])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.22, 0.25, 0.30])
    parser.add_argument("--sanity", nargs="*", default=[], choices=TEXTS, metavar="TEXT", help="check on these texts")
    parser.add_argument("--sanity-criterion", default="far_mass", choices=CRITERIA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    session = smollm2_session()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sanity": {}, "rows": []}
    if args.sanity:
        report["sanity"]["scorer identity vs engine: max |Δ|"] = scorer_check()
    print(TABLE_HEADER, flush=True)
    for text in args.texts:
        for length in args.lengths:
            runs = Runs(session, text, token_ids(session.tokenizer, text, length), args.out / f"{text}_{length}.csv")
            runs.get(None, None)
            if text in args.sanity:
                checks = sanity_checks(runs, args.sanity_criterion)
                report["sanity"].update({f"{text} {length}: {name}": value for name, value in checks.items()})
            for line in args.lines:
                for threshold in args.thresholds:
                    runs.get(line, threshold)
            report["rows"] += list(runs.rows.values())
            (args.out / "results.json").write_text(json.dumps(report, indent=1))

    matched = [m for by in ("density", "cost") for m in matched_density(report["rows"], args.densities, by)]
    report["matched"] = matched
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    sanity = "\n".join(f"* {name}: {value:.3g}" for name, value in report["sanity"].items())
    rows = "\n".join(format_row(r) for r in report["rows"])
    summary = (
        f"## Sanity checks\n\n{sanity}\n\n## Runs\n\n{TABLE_HEADER}\n{rows}\n\n"
        f"## Δppl / Δ last 1K (%) at matched density\n\n{matched_table(matched, args.densities)}\n"
    )
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
