"""The `trainer` and `pretrain` groups' schemas: the defaults of configs/trainer, configs/pretrain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from bnn_train.errors import one_of, require


@dataclass
class TrainerConfig:
    epochs: int = 20
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    precision: str = "fp32"
    log_every_n_steps: int = 20
    hist_every_n_epochs: int = 5
    progress: Any = "auto"
    resume: Any = False
    checkpoint: bool = True
    ckpt_every_n_steps: Optional[int] = None
    skip_nonfinite: int = 0
    deterministic: bool = False
    binary_precision: str = "auto"
    binary_backward: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    keep_cpu_memory: bool = True

    def __post_init__(self):
        require(self.epochs >= 0, "epochs", self.epochs, "must be >= 0")
        for key in ("limit_train_batches", "limit_val_batches", "ckpt_every_n_steps"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, value, "must be >= 1 (or null)")
        for key in ("log_every_n_steps", "hist_every_n_epochs"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        require(self.skip_nonfinite >= 0, "skip_nonfinite", self.skip_nonfinite, "must be >= 0")
        one_of(self, "precision", "fp32", "bf16")
        one_of(self, "progress", "auto", "true", "false")
        one_of(self, "resume", "auto", "true", "false")
        one_of(self, "binary_precision", "auto", "fp32", "bf16", "int8")
        one_of(self, "binary_backward", "fp32", "bf16")


@dataclass
class PretrainConfig:
    """epochs, lr (null: optim.lr) and checkpoint (reuse a finished stage 1) of a pretraining stage."""

    name: str = "???"
    epochs: int = 10
    lr: Optional[float] = None
    checkpoint: Optional[str] = None

    def __post_init__(self):
        require(self.epochs >= 0, "epochs", self.epochs, "must be >= 0")
        require(self.lr is None or self.lr > 0, "lr", self.lr, "must be > 0 (or null)")


@dataclass
class NoPretrainConfig(PretrainConfig):
    name: str = "none"
    epochs: int = 0  # unused: the keys are there so that sweeps over pretrain= can set them


PRETRAIN_SCHEMAS = {"none": NoPretrainConfig, **{n: PretrainConfig for n in ("relu", "clip", "binary_act")}}
