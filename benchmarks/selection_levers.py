"""Quality levers measured outside the engine: skipped-block compensation, an absolute mass
threshold, and 128-query × 64-key blocks.

Each starts from the engine's own plan (default ``PBSConfig`` at a threshold: scores, forced
blocks, selection) for every layer of SmolLM2-135M and changes one thing; attention is then
computed exactly in float32 with a token mask (chunks of 1024 queries), GQA by repeating K/V:

* ``engine``: the engine's selection, computed by this path (a sanity line: it must reproduce
  the engine's own perplexity, which is measured too).
* ``compensation``: the engine's selection, plus one pooled key per *skipped* causal block, its
  keys' mean with logit ``scale · q · k̄ + log(block_size)`` and its values' mean as value, in
  the same softmax. The skipped mass is estimated instead of dropped. By Jensen's inequality
  the pooled logit underestimates a peaked block's mass, which is what one wants: giving a
  skipped block its *exact* mass with the mean value (``--oracle-mass``, an upper-bound probe)
  is far worse than dropping it.
* ``absolute``: keep the forced blocks plus every causal block whose estimated share of its
  row's mass is at least ``tau`` (``--taus``), instead of the fewest blocks reaching a
  cumulative threshold. For a fixed budget this keeps the blocks with the most estimated mass
  over the whole layer rather than the same share of mass in every row.
* ``key64``: blocks of 128 queries × 64 keys, the layout FlexAttention runs at nearly full speed
  on Hopper (``BLOCK_N=64``) where 64-row query tiles are slow: the engine plans with 64-token
  blocks, the scores of each pair of query rows are summed, and the engine's threshold selection
  runs on the wider rows with the same forced span (the query block's own keys, 512 tokens before
  them, key block 0). Does it keep the quality that 64-token blocks gain? (The engine has since
  gained this layout, ``PBSConfig(key_block_size=64, force_local_blocks=8)``, and reproduces the
  line's numbers; the line stays to regenerate the committed CSVs.)

``--scoring``, ``--stride`` and ``--peak-weight`` set the engine's scorer for every line (the CSV
line then reads ``key64 stride=4``, ``key64 peak_weight=0.5``, ``key64 scoring=oracle``: exact
block mass, the bound any estimate of it can reach). ``--score-power p`` selects on scores
raised to ``p`` (line ``engine power=0.5``). Every line starts from ``pbs_fast`` (square
128-token blocks), the default when these levers were measured.

Writes ``<text>_<length>.csv`` (readable by ``quality_at_density.py``) and ``summary.md`` under
``benchmarks/quality/segment128/levers/selection_levers/``; rows already in a CSV are reused.
About 2 minutes per pass on 2 CPU threads at 8K. The committed results::

    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.85 0.9 0.93 --taus 0.01 0.015 0.02
    .venv/bin/python benchmarks/selection_levers.py --texts prose --thresholds 0.9 --taus --lines engine compensation
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.9 --taus --lines compensation --oracle-mass
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.9 0.93 --taus --lines key64
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.9 0.93 --taus --lines key64 --stride 4
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.9 0.93 --taus --lines key64 --scoring oracle
    .venv/bin/python benchmarks/selection_levers.py --texts code prose --thresholds 0.9 0.93 --taus --lines key64 --peak-weight 0.5
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.75 0.8 --taus --lines engine --score-power 0.5
    .venv/bin/python benchmarks/selection_levers.py --texts code --thresholds 0.8 0.85 --taus --lines engine --score-power 0.7
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import flex_pbs
from flex_pbs import PBSConfig, build_plan
from flex_pbs.engine.pipeline import PBSPlan
from flex_pbs.runner.data import TEXTS, token_ids
from flex_pbs.engine.methods import method_config
from flex_pbs.runner.measure import perplexity, stats_summary, timed_forward, token_losses
from flex_pbs.runner.session import (
    Session, attention, experimental_attention, smollm2_session, whole_prefill_scale,
)
from flex_pbs.runner.tasks import relative_change_pct
from flex_pbs.engine.select import forced_blocks, select_blocks

sys.path.insert(0, str(Path(__file__).parent))
from quality_at_density import interpolate, read_lines  # noqa: E402

OUT = Path(__file__).parent / "quality/segment128/levers/selection_levers"
ATTENTION_NAME = "flex_pbs_selection_levers"
TAIL_TOKENS = 1024
QUERY_CHUNK = 1024
LINES = ("engine", "compensation", "absolute", "key64")


def absolute_selection(plan: PBSPlan, causal: torch.Tensor, config: PBSConfig, tau: float) -> torch.Tensor:
    """bool ``[B, Hq, nQ, nK]``: forced blocks plus causal blocks (``causal``, per query head)
    holding >= ``tau`` of their row's estimated mass."""
    group = causal.shape[1] // plan.key_order.shape[1]
    forced = forced_blocks(plan.key_order, plan.layout, config).expand_as(plan.causal_blocks)
    share = plan.block_scores / plan.block_scores.sum(dim=-1, keepdim=True)
    return causal & (forced.repeat_interleave(group, dim=1) | (share >= tau))


def powered_selection(plan: PBSPlan, causal: torch.Tensor, config: PBSConfig, power: float) -> torch.Tensor:
    """bool ``[B, Hq, nQ, nK]``: the engine's threshold rule on block scores raised to ``power``.
    Below 1 it flattens every row's estimate, so at the same overall density peaked rows keep
    more blocks and diffuse rows fewer (exact masses, sharper than the estimate, did worse)."""
    group = causal.shape[1] // plan.key_order.shape[1]
    forced = forced_blocks(plan.key_order, plan.layout, config).expand_as(plan.causal_blocks)
    return select_blocks(
        plan.block_scores.clamp_min(0) ** power, candidates=causal, forced=forced.repeat_interleave(group, dim=1),
        threshold=config.threshold, counts_forced=config.threshold_counts_forced,
    )


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, causal: torch.Tensor,
    block_sizes: tuple[int, int], scale: float, compensate: str | None,
) -> torch.Tensor:
    """Exact causal attention over the selected blocks, optionally with pooled skipped blocks.

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hq, L, D]`` (K/V repeated per query head), L a multiple
            of both block sizes; selected, causal: bool ``[B, Hq, nQ, nK]``.
        block_sizes: ``(query block, key block)`` in tokens.
        compensate: None, ``"mean"`` (pooled key logit) or ``"oracle_mass"`` (the block's exact
            log-mass, with the mean value).
    """
    q_block, kv_block = block_sizes
    batch, heads, length, dim = k.shape
    n_blocks = length // kv_block
    if compensate is not None:
        k_mean = k.view(batch, heads, n_blocks, kv_block, dim).mean(3)
        v_mean = v.view(batch, heads, n_blocks, kv_block, dim).mean(3)
    positions = torch.arange(length, device=q.device)
    out = torch.empty_like(q)
    for start in range(0, length, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, length)
        rows = slice(start // q_block, -(-stop // q_block))
        logits = scale * q[:, :, start:stop] @ k.transpose(-1, -2)
        visible = selected[:, :, rows].repeat_interleave(q_block, 2).repeat_interleave(kv_block, 3)
        visible = visible[:, :, : stop - start] & (positions[None, :] <= positions[start:stop, None])
        values = v
        if compensate is not None:
            if compensate == "mean":
                pooled = scale * q[:, :, start:stop] @ k_mean.transpose(-1, -2) + math.log(kv_block)
            else:
                pooled = logits.view(batch, heads, stop - start, n_blocks, kv_block).logsumexp(-1)
            skipped = (causal & ~selected)[:, :, rows].repeat_interleave(q_block, 2)[:, :, : stop - start]
            logits = torch.cat([logits.masked_fill(~visible, -math.inf), pooled.masked_fill(~skipped, -math.inf)], -1)
            values = torch.cat([v, v_mean], dim=2)
        else:
            logits = logits.masked_fill(~visible, -math.inf)
        out[:, :, start:stop] = torch.softmax(logits, dim=-1) @ values
    return out


def wide_query_selection(
    plan: PBSPlan, threshold: float, local_keys: int, q_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected, causal)``, bool ``[B, Hq, L/q_block, nK]``: blocks of ``q_block`` queries ×
    the plan's (smaller) key blocks. Scores of the plan's query blocks are summed into the wider
    ones; forced: the key blocks overlapping the query block (its diagonal), ``local_keys`` tokens
    of key blocks before it, and key block 0 (the sink); then the engine's threshold selection."""
    kv_block = plan.layout.block_size
    batch, heads, n_rows, n_keys = plan.block_scores.shape
    per_row = q_block // kv_block
    scores = plan.block_scores.view(batch, heads, n_rows // per_row, per_row, n_keys).sum(3)
    rows = torch.arange(n_rows // per_row, device=scores.device)[:, None]
    keys = torch.arange(n_keys, device=scores.device)[None, :]
    first, last = rows * per_row, rows * per_row + per_row - 1  # the query block in key blocks
    causal = keys <= last
    forced = causal & ((keys >= first - local_keys // kv_block) | (keys == 0))
    selected = select_blocks(scores, candidates=causal, forced=forced, threshold=threshold)
    return selected, causal.expand_as(selected)


@dataclass
class LeverAttention:
    """The registered attention: the engine's plan per layer, changed by one lever."""

    config: PBSConfig
    line: str
    tau: float | None = None
    compensate: str = "mean"
    power: float = 1.0
    density: dict[int, float] = field(default_factory=dict)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = whole_prefill_scale(attention_mask, query, self.config.block_size, scaling)
        group = query.shape[1] // key.shape[1]
        block_sizes = (self.config.block_size, self.config.block_size)
        if self.line == "key64":
            local_keys = self.config.force_local_blocks * self.config.block_size
            plan = build_plan(query, key, self.config.replace(block_size=64, segment_size=64), scale=scale)
            selected, causal = wide_query_selection(plan, self.config.threshold, local_keys, self.config.block_size)
            block_sizes = (self.config.block_size, 64)
        else:
            plan = build_plan(query, key, self.config, scale=scale)
            causal = plan.causal_blocks.repeat_interleave(group, dim=1)
            if self.line == "absolute":
                selected = absolute_selection(plan, causal, self.config, self.tau)
            elif self.power != 1.0:
                selected = powered_selection(plan, causal, self.config, self.power)
            else:
                selected = plan.block_mask
        self.density[module.layer_idx] = float(selected.sum() / causal.sum())
        q, k, v = query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
        compensate = self.compensate if self.line == "compensation" else None
        out = masked_attention(q, k, v, selected, causal, block_sizes, scale, compensate)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def evaluate(session: Session, ids: torch.Tensor, line: str, base: PBSConfig, threshold: float | None,
             tau: float | None, compensate: str, power: float = 1.0) -> dict[str, Any]:
    """One forward pass of a line (``dense``, ``engine_native`` = the engine itself, or a lever),
    the engine configured as ``base`` at ``threshold``."""
    if line == "dense":
        with attention(session, None):
            output, wall = timed_forward(session, ids)
        density = 1.0
    elif line == "engine_native":
        with attention(session, base.replace(threshold=threshold), collect_stats=True):
            output, wall = timed_forward(session, ids)
            density = stats_summary(flex_pbs.stats(session.model))["density"]
    else:
        function = LeverAttention(base.replace(threshold=threshold), line, tau, compensate, power)
        with experimental_attention(session, ATTENTION_NAME, function):
            output, wall = timed_forward(session, ids)
        density = sum(function.density.values()) / len(function.density)
    losses = token_losses(output.logits, ids)
    return {"perplexity": perplexity(losses), "tail_perplexity": perplexity(losses[-TAIL_TOKENS:]),
            "density": density, "wall_s": wall}


def run_name(line: str, compensate: str, base: PBSConfig, power: float = 1.0) -> str:
    """The CSV line: the lever, then what differs from the default scorer (``key64 stride=4``)."""
    name = "compensation_oracle_mass" if line == "compensation" and compensate == "oracle_mass" else line
    if line == "dense":
        return name
    default = PBSConfig()
    changed = [f"{field}={getattr(base, field)}" for field in ("scoring", "stride")
               if getattr(base, field) != getattr(default, field)]
    if base.peak_weight:
        changed.append(f"peak_weight={base.peak_weight}")
    if power != 1.0 and line not in ("engine_native", "absolute", "key64"):
        changed.append(f"power={power}")
    return " ".join([name, *changed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", nargs="+", default=["code"], choices=TEXTS)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--lines", nargs="+", default=list(LINES), choices=LINES)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9], help="engine and compensation")
    parser.add_argument("--taus", type=float, nargs="*", default=[0.01, 0.02], help="absolute (threshold 0.9 plan)")
    parser.add_argument("--oracle-mass", action="store_true", help="compensation with exact skipped mass (probe)")
    parser.add_argument("--scoring", default=PBSConfig().scoring, help="the engine's block scores (PBSConfig.scoring)")
    parser.add_argument("--stride", type=int, default=PBSConfig().stride, help="antidiagonal stride")
    parser.add_argument("--peak-weight", type=float, default=0.0, help="PBSConfig.peak_weight (named in the line)")
    parser.add_argument("--score-power", type=float, default=1.0,
                        help="select on block scores raised to this power (lines other than absolute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    session = smollm2_session()
    compensate = "oracle_mass" if args.oracle_mass else "mean"
    # The levers were measured on the default of their day, square 128-token blocks (pbs_fast).
    base = method_config("pbs_fast", scoring=args.scoring, stride=args.stride, peak_weight=args.peak_weight)

    for text in args.texts:
        ids = token_ids(session.tokenizer, text, args.length)
        path = args.out / f"{text}_{args.length}.csv"
        rows = {}
        if path.is_file():
            with path.open() as f:
                rows = {(r["line"], r["threshold"], r["tau"]): r for r in csv.DictReader(f)}
        wanted = [("dense", None, None)]
        for line in args.lines:
            if line == "absolute":
                wanted += [("absolute", 0.9, tau) for tau in args.taus]
            else:
                wanted += [(line, t, None) for t in args.thresholds]
                if line == "engine" and args.score_power == 1.0:
                    wanted += [("engine_native", t, None) for t in args.thresholds]
        for line, threshold, tau in wanted:
            name = run_name(line, compensate, base, args.score_power)
            key = (name, "" if threshold is None else str(threshold), "" if tau is None else str(tau))
            if key in rows:
                continue
            row = evaluate(session, ids, line, base, threshold, tau, compensate, args.score_power)
            dense = rows.get(("dense", "", ""), row)
            row.update(
                text=text, seq_len=args.length, line=name, method=name, threshold=key[1], tau=key[2],
                delta_pct=relative_change_pct(row["perplexity"], float(dense["perplexity"])),
                tail_delta_pct=relative_change_pct(row["tail_perplexity"], float(dense["tail_perplexity"])),
            )
            if name == "dense":
                row["method"] = "dense"
            rows[key] = row
            print(f"| {text} | {name} | {key[1]} | {key[2]} | {row['density']:.4f} | {row['perplexity']:.4f} | "
                  f"{row['delta_pct']:+.2f} | {row['tail_delta_pct']:+.2f} |", flush=True)
            fields = ["text", "seq_len", "line", "method", "threshold", "tau", "density", "perplexity",
                      "tail_perplexity", "delta_pct", "tail_delta_pct", "wall_s"]
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows({k: r[k] for k in fields} for r in rows.values())
    summary = summarise(args.out, args.length)
    (args.out / "summary.md").write_text(summary)
    print(summary)


def summarise(out: Path, length: int) -> str:
    """Every row of every text's CSV at ``length``, then each lever row against the default."""
    parts = []
    for path in sorted(out.glob(f"*_{length}.csv")):
        text = path.name.removesuffix(f"_{length}.csv")
        with path.open() as f:
            rows = list(csv.DictReader(f))
        parts.append(f"## {text} {length}\n\n| line | threshold | tau | density | perplexity | Δppl % | Δ last 1K % |"
                     "\n|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["line"], float(r["density"]))):
            parts.append(f"| {r['line']} | {r['threshold'] or '-'} | {r['tau'] or '-'} | {float(r['density']):.4f} | "
                         f"{float(r['perplexity']):.4f} | {float(r['delta_pct']):+.2f} | {float(r['tail_delta_pct']):+.2f} |")
        parts.append(matched_with_default(path, text, length))
    return "\n".join(parts)


def matched_with_default(path: Path, text: str, length: int) -> str:
    """Each lever row next to the default's sweep interpolated at the row's density."""
    default = read_lines(Path(__file__).parent / f"quality/segment128/{text}_{length}_sweep.csv")
    default_line = "pbs, segment_size=128, stride=8, force_local_blocks=4"
    out = ["", f"Against the default's sweep (`{text}_{length}_sweep.csv`) at the same density:", "",
           "| line | threshold | tau | density | Δppl / Δ last 1K % | default there |", "|---|---|---|---|---|---|"]
    with path.open() as f:
        for r in csv.DictReader(f):
            if r["line"] in ("dense", "engine_native"):
                continue
            at = interpolate(default[default_line], float(r["density"]))
            there = "-" if at is None else f"{at[0]:+.2f} / {at[1]:+.2f}"
            out.append(f"| {r['line']} | {r['threshold'] or '-'} | {r['tau'] or '-'} | {float(r['density']):.4f} | "
                       f"{float(r['delta_pct']):+.2f} / {float(r['tail_delta_pct']):+.2f} | {there} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
