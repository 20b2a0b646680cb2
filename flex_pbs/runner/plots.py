"""Figures of the runner's results, drawn without pyplot (no GUI backend, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def _grouped_bars(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Bars per method (x), one bar per series side by side; missing values drawn empty, "-"."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(positions, [0.0 if v is None else v for v in values], width, label=name)
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.3g}" for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.margins(y=0.15)
    ax.set_xlabel("method")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_perplexity(rows: list[dict[str, Any]], tail_header: str, path: Path) -> None:
    """Per method: perplexity (full and tail), its change vs dense, and density / recall."""
    labels = [r["method"] for r in rows]
    fig = Figure(figsize=(13, 4), layout="constrained")
    ppl, delta, density = fig.subplots(1, 3)
    series = {"full sequence": "perplexity", tail_header: "tail_perplexity"}
    _grouped_bars(ppl, labels, {n: [r[k] for r in rows] for n, k in series.items()}, "perplexity",
                  f"perplexity, {rows[0]['seq_len']} tokens")
    deltas = {"full sequence": "delta_pct", tail_header: "tail_delta_pct"}
    _grouped_bars(delta, labels, {n: [r[k] for r in rows] for n, k in deltas.items()}, "change vs dense (%)",
                  "perplexity change vs dense")
    _grouped_bars(density, labels, {"density": [r["density"] for r in rows], "recall": [r["recall"] for r in rows]},
                  "mean over layers and heads", "density (computed / causal blocks), recall")
    density.set_ylim(0, 1.15)
    fig.savefig(path, dpi=120)


def plot_passkey(rows: list[dict[str, Any]], depth_keys: list[tuple[str, float]], path: Path) -> None:
    """Passkey accuracy against needle depth, one line per method and length."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for row in rows:
        depths = [depth for _, depth in depth_keys]
        ax.plot(depths, [row[key] for key, _ in depth_keys], marker="o", label=f"{row['method']}, {row['length']} tok")
    ax.set_xlabel("needle depth (0 = start, 1 = end)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_layer_head_maps(density: list[list[float]], recall: list[list[float]] | None, layers: list[int], path: Path) -> None:
    """Heatmaps of density (and recall) per layer (rows) and query head (columns)."""
    panels = [("density (computed / causal blocks)", density)] + ([("recall", recall)] if recall else [])
    fig = Figure(figsize=(5 * len(panels), 2 + 0.25 * len(layers)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels):
        image = ax.imshow(values, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xticks(range(len(values[0])))
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    """Median prefill time per method, and mean density."""
    labels = [r["method"] for r in rows]
    fig = Figure(figsize=(8, 4), layout="constrained")
    time_ax, density_ax = fig.subplots(1, 2)
    _grouped_bars(time_ax, labels, {"prefill": [r["prefill_s"] for r in rows]}, "prefill wall time (s, median)",
                  f"prefill, {rows[0]['seq_len']} tokens")
    _grouped_bars(density_ax, labels, {"density": [r["density"] for r in rows]},
                  "mean density (computed / causal blocks)", "density")
    density_ax.set_ylim(0, 1.1)
    fig.savefig(path, dpi=120)


def _varying_name(curves: dict[str, list[dict[str, Any]]]) -> str:
    """What the point labels are: the field name when every point varies the same one field."""
    labels = {p["point_label"] for points in curves.values() for p in points}
    names = {label.split("=", 1)[0] for label in labels if "," not in label and "=" in label}
    return names.pop() if len(names) == 1 else "settings"


def plot_sweep(curves: dict[str, list[dict[str, Any]]], dense: list[dict[str, Any]], tail_header: str, path: Path) -> None:
    """Perplexity (left) and tail perplexity (right) against mean density: one line per method
    across its runs, dense as a horizontal reference line per context length."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("perplexity", "tail_perplexity"), ("perplexity", tail_header)):
        for i, (label, points) in enumerate(curves.items()):
            ax.plot([p["density"] for p in points], [p[key] for p in points], marker="o", color=f"C{i}", label=label)
            for p in points:  # just the values: the legend says what varies
                value = p["point_label"].split("=", 1)[-1] if "," not in p["point_label"] else p["point_label"]
                ax.annotate(value, (p["density"], p[key]), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=f"C{i}")
        for j, row in enumerate(dense):
            ax.axhline(row[key], color="k", linestyle="--" if j == 0 else ":", linewidth=1, label=f"dense, {row['seq_len']} tok")
        ax.set_xlabel("mean density (computed / causal blocks)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs density (points: {_varying_name(curves)})")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
