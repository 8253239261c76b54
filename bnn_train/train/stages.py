"""Multi-stage runs: a pretraining stage, then the binary network initialized from it.

pretrain=relu|clip (Bi-Real Net, Liu et al. 2018, sec. 3.3): stage 1 trains the same architecture
with real weights and ReLU or clip(x, -1, 1) where the method's sign would be. pretrain=binary_act
(two-step training: Martinez et al. 2020, "Training Binary Neural Networks with Real-to-Binary
Convolutions"; ReActNet, Liu et al. 2020): stage 1 keeps the binary activations and real weights.
Stage 2 is the configured method, initialized from stage 1's weights. Each stage trains, logs and
checkpoints in its own subfolder (stage1/, stage2/); the run's metrics.json reports both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from bnn_train.train.loop import fit
from bnn_train.train.records import write_json_atomic

log = logging.getLogger(__name__)

STAGE1 = {
    "relu": {"real_weights": True, "input_act": "relu"},
    "clip": {"real_weights": True, "input_act": "clip"},
    "binary_act": {"real_weights": True},
}


def run(cfg, run_dir: Path, choices: dict | None = None) -> dict:
    """Train every stage the config asks for; return the final stage's metrics."""
    run_dir = Path(run_dir)
    if cfg.pretrain.name == "none":
        return fit(cfg, run_dir, choices)
    pre = cfg.pretrain
    stages = {}
    stage1_ckpt = Path(pre.checkpoint) if pre.checkpoint is not None else None
    if stage1_ckpt is None:
        log.info("stage 1 of 2: pretrain=%s for %d epochs", pre.name, pre.epochs)
        stages["stage1"] = fit(stage1_config(cfg), run_dir / "stage1", choices, stage=STAGE1[pre.name])
        stage1_ckpt = run_dir / "stage1" / "checkpoints" / "last.pt"
    else:
        log.info("stage 1 reused from %s", stage1_ckpt)
    log.info("stage 2 of 2: method=%s", cfg.method.name)
    stages["stage2"] = fit(cfg, run_dir / "stage2", choices, init_from=stage1_ckpt)
    metrics = {**stages["stage2"], "stage1_checkpoint": str(stage1_ckpt),
               "stages": {name: _brief(m) for name, m in stages.items()}}
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def stage1_config(cfg):
    """The run's config with the pretraining stage's epochs and learning rate."""
    cfg1 = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg1.trainer.epochs = cfg.pretrain.epochs
    if cfg.pretrain.lr is not None:
        cfg1.optim.lr = cfg.pretrain.lr
    return cfg1


def _brief(metrics: dict) -> dict:
    keys = ("status", "best_val_acc", "final_val_acc", "epochs_completed", "train_time_s", "train_samples_per_s")
    return {k: metrics[k] for k in keys}
