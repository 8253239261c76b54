"""Train a binary neural network: `python train.py method=xnor model=resnet18`.

Hydra composes configs/train.yaml with the chosen group options; see the README for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnn_train.cli import check_overrides, report_user_errors, run_cli
from bnn_train.config import validate

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float:
    validate(cfg)
    from bnn_train.train.loop import fit  # torch loads only once the config is known to be good

    runtime = HydraConfig.get().runtime
    choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra/")}
    metrics = fit(cfg, Path(runtime.output_dir), choices)
    return metrics["best_val_acc"]  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    run_cli(lambda: (check_overrides(sys.argv[1:], CONFIG_DIR), main()))
