"""What every task shares: the compared methods, the leading columns of a row, notes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from flex_pbs.engine.config import PBSConfig
from flex_pbs.integrations.tensor_parallel import rank
from flex_pbs.runner.session import Session

if TYPE_CHECKING:
    from flex_pbs.runner.schema import RunSpec


@dataclass(frozen=True)
class Method:
    """A method as the tasks run it: its name and engine config (None = dense SDPA)."""

    name: str
    engine: PBSConfig | None


def compared_methods(spec: RunSpec) -> list[Method]:
    """``dense`` first, then the configured method (once, if it is dense itself)."""
    dense = Method("dense", None)
    return [dense] if spec.engine is None else [dense, Method(spec.method, spec.engine)]


def method_fields(method: Method) -> dict[str, Any]:
    """The columns every row starts with: method name, its threshold and full engine config."""
    engine = None if method.engine is None else dataclasses.asdict(method.engine)
    return {"method": method.name, "threshold": None if engine is None else engine["threshold"], "engine": engine}


def relative_change_pct(value: float | None, reference: float | None) -> float | None:
    """``100 * (value - reference) / reference``, or None when either is missing."""
    if value is None or reference is None:
        return None
    return 100.0 * (value - reference) / reference


def random_weights_notes(session: Session, spec: RunSpec) -> list[str]:
    """The caveat that random-weight results measure the approximation, not model quality."""
    if not session.random_weights:
        return []
    return [
        f"model {spec.model.name} has random weights: evaluated on uniform random token ids "
        f"(seed {spec.seed}); passkey prompts use a byte-level tokenizer. Differences from dense "
        "measure the attention approximation, not model quality."
    ]


def grouped_bars(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
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


def progress(iterable, **kwargs: Any) -> tqdm:
    """A progress bar on a terminal only (redirected stderr gets no escape codes), and only on
    rank 0 of a tensor-parallel job."""
    disable = kwargs.pop("disable", None)
    return tqdm(iterable, disable=True if rank() else disable, **kwargs)
