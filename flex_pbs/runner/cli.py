"""``flex-pbs-run`` (or ``python -m flex_pbs.runner.cli``): the experiment runner's Hydra entry point.

How sparse can attention go on a model, what does it cost in quality, what does it buy in
speed? Configs ship in package ``flex_pbs.configs`` (the repository's ``configs/``); see
``flex-pbs-run --help`` for the groups and ``flex-pbs-run --cfg job`` for the composed config.
Sweeps: ``flex-pbs-run -m method=pbs,xattention method.threshold=0.8,0.9`` then
``flex-pbs-sweep multirun/<date>/<time>``.

A user's mistake (a :class:`~flex_pbs.runner.checks.ConfigError`, or a top-level override of a
key that lives in the method, model or task node) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flex_pbs.runner.checks import ConfigError, fail
from flex_pbs.runner.job import (
    run_job,  # importing the runner registers its structured configs
)
from flex_pbs.runner.schema import RunConfig, field_names, misplaced_key_hint

PROG = "flex-pbs-run"


@hydra.main(version_base=None, config_path="pkg://flex_pbs.configs", config_name="config")
def run(cfg: DictConfig) -> None:
    """Run one job in Hydra's run (or multirun job) directory; a ConfigError ends the process
    with its message (in a sweep, naming the job)."""
    hydra_cfg = HydraConfig.get()
    try:
        run_job(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task)
    except ConfigError as error:
        job = ""
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): "
        fail(PROG, f"{job}{error}")


def command_line_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides among Hydra's command-line arguments (none if Hydra would reject them)."""
    try:
        from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

        args, rest = get_args_parser().parse_known_args(list(argv))
    except (ImportError, SystemExit):
        return []
    return [*args.overrides, *(arg for arg in rest if not arg.startswith("-"))]


def misplaced_override(argv: Sequence[str]) -> str | None:
    """The message for an override of a top-level key that the run lacks but the method, model
    or task node has (``threshold=0.8``): Hydra would answer "use +threshold=0.8", which adds
    a key that validation then rejects. None when there is no such override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(command_line_overrides(argv))
    except HydraException:
        return None  # Hydra reports it
    top_level = field_names(RunConfig) | {"hydra"}
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package is not None or key.split(".", 1)[0] in top_level:
            continue  # +key=... and ++key=... reach validation, which gives the same hint
        _, value = override.input_line.split("=", 1)
        hint = misplaced_key_hint(key, value)
        if hint:
            return f"{key} is not a configurable key; did you mean {hint}?"
    return None


def quiet_rank_overrides() -> list[str]:
    """Under ``torchrun`` every rank runs the job; ranks other than 0 write no Hydra output
    directory or log (rank 0 writes the results)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    scratch = tempfile.mkdtemp(prefix="flex_pbs_rank")
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def main() -> None:
    """Console script ``flex-pbs-run``: Hydra's command line (overrides, ``-m``, ``--help``, ...)."""
    message = misplaced_override(sys.argv[1:])
    if message:
        fail(PROG, message)
    sys.argv += quiet_rank_overrides()
    run()


if __name__ == "__main__":
    main()
