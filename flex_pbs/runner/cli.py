"""``flex-pbs-run`` (or ``python -m flex_pbs.runner.cli``): the experiment runner's Hydra entry point.

How sparse can attention go on a model, what does it cost in quality, what does it buy in
speed? Configs ship in package ``flex_pbs.configs`` (the repository's ``configs/``); see
``flex-pbs-run --help`` for the groups and ``flex-pbs-run --cfg job`` for the composed config.
Sweeps: ``flex-pbs-run -m method=pbs,xattention method.threshold=0.8,0.9`` then
``flex-pbs-sweep multirun/<date>/<time>``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flex_pbs.runner.job import (
    run_job,  # importing the runner registers its structured configs
)


@hydra.main(version_base=None, config_path="pkg://flex_pbs.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one job in Hydra's run (or multirun job) directory."""
    hydra_cfg = HydraConfig.get()
    run_job(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task)


if __name__ == "__main__":
    main()
