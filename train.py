"""Train a binary neural network: `python train.py method=xnor model=resnet18`.

Hydra composes configs/train.yaml with the chosen group options; see the README for every option.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnn_train.cli import preflight, report_user_errors, run_cli
from bnn_train.config import validate

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float:
    validate(cfg)
    from bnn_train.train import stages  # torch loads only once the config is known to be good

    runtime = HydraConfig.get().runtime
    choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra/")}
    metrics = stages.run(cfg, Path(runtime.output_dir), choices)
    return metrics["best_val_acc"]  # the value a Hydra sweeper optimizes


def torchrun_overrides(argv: list[str]) -> list[str]:
    """Under torchrun every process runs this script: give them one shared run dir (the default
    one is stamped with each process's own clock) and let only rank 0 write Hydra's logs."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return []
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        run_id = run_id if run_id != "none" else f"agent{os.getppid()}"  # all ranks share the agent
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if int(os.environ.get("RANK", 0)) != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return extra


if __name__ == "__main__":
    sys.argv += torchrun_overrides(sys.argv[1:])
    run_cli(lambda: (preflight(sys.argv[1:], CONFIG_DIR), main()))
