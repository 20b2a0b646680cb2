"""One run of ``flex-pbs-run``: validate, load the model, run the task, print and write results."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from flex_pbs.integrations.tensor_parallel import rank
from flex_pbs.runner.report import environment, format_table, write_results
from flex_pbs.runner.schema import validate
from flex_pbs.runner.session import load_session
from flex_pbs.runner.tasks import TASKS


def run_job(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the task a composed config describes and write ``results.{json,csv,png}`` to ``out_dir``.

    The config is validated before any model loads. Returns the ``results.json`` payload. Under
    tensor parallelism (``tp > 1``, every rank runs the job) only rank 0 writes and prints.

    Args:
        cfg: the composed config (``configs/config.yaml`` plus overrides).
        out_dir: where the results go (Hydra's run or job directory).
        overrides: the command-line overrides of this job, recorded with the results.
    """
    spec = validate(cfg)
    session = load_session(spec)
    result, plot = TASKS[spec.task.name].run(spec, session)
    payload = {
        "task": result.task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": list(overrides),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(spec.device),
        "notes": result.notes,
        "rows": result.rows,
        "details": result.details,
    }
    if rank() != 0:  # under tensor parallelism every rank ran the task; rank 0 reports it
        return payload
    files = write_results(Path(out_dir), payload, result.rows, plot)
    title = f"{result.task}: model={spec.model.name} method={spec.method} text={spec.text} device={spec.device}"
    title += f" tp={spec.tp}" if spec.tp > 1 else ""
    print(f"\n{title}\n\n{format_table(result.rows, result.columns)}\n")
    for note in result.notes:
        print(f"* {note}")
    print(f"\nresults: {', '.join(str(f) for f in files)}")
    return payload
