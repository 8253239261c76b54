"""Optimizers and per-step learning-rate schedules, built from the `optim` and `sched` groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor, nn

from bnn_train.errors import one_of, require

# ---- the `optim` and `sched` groups' schemas (the defaults of configs/optim, configs/sched) ----


@dataclass
class OptimConfig:
    name: str = "???"
    lr: float = 0.001
    weight_decay: float = 0.0
    decay_binary: bool = False
    latent_lr_scale: str = "none"

    def __post_init__(self):
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        one_of(self, "latent_lr_scale", "none", "glorot")


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self):
        super().__post_init__()
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "must be two values in [0, 1)")


@dataclass
class SGDConfig(OptimConfig):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0005

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(not (self.nesterov and self.momentum == 0), "nesterov", self.nesterov, "needs optim.momentum > 0")


@dataclass
class ConstantConfig:
    name: str = "constant"
    warmup_epochs: int = 0

    def __post_init__(self):
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")


@dataclass
class CosineConfig(ConstantConfig):
    name: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class StepConfig(ConstantConfig):
    name: str = "step"
    milestones: List[int] = field(default_factory=lambda: [30, 60, 90])
    gamma: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        m = self.milestones
        require(all(v >= 1 for v in m) and all(a < b for a, b in zip(m, m[1:])), "milestones", m,
                 "must be increasing epochs >= 1")
        require(self.gamma > 0, "gamma", self.gamma, "must be > 0")


OPTIM_SCHEMAS = {"adam": AdamConfig, "sgd": SGDConfig}
SCHED_SCHEMAS = {"constant": ConstantConfig, "cosine": CosineConfig, "step": StepConfig}



def glorot_lr_scale(weight: Tensor) -> float:
    """1/H with H = sqrt(1.5 / (fan_in + fan_out)): BinaryConnect's per-layer learning-rate factor
    (Courbariaux, Bengio & David 2015, sec. 2.5 and its reference code). It lets latent weights
    travel the whole [-1, 1] range at a step size meant for real weights, which the stochastic
    variant needs: its sampling probabilities only leave 1/2 when |W| grows."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def param_groups(model: nn.Module, binary_weights: list[nn.Parameter], weight_decay: float,
                 decay_binary: bool, latent_lr_scale: str = "none") -> list[dict]:
    """Separate groups so that weight decay can spare the latent weights of binarized layers: decay
    pulls them towards 0, where their sign flips on noise (Bi-Real Net and ReActNet train
    binary weights without it). latent_lr_scale=glorot gives each binarized layer its own group
    whose `lr_scale` multiplies the base learning rate."""
    binary_ids = {id(p) for p in binary_weights}
    binary = [p for p in model.parameters() if id(p) in binary_ids]
    real = [p for p in model.parameters() if id(p) not in binary_ids]
    groups = [{"params": real, "weight_decay": weight_decay}]
    binary_decay = weight_decay if decay_binary else 0.0
    if binary and latent_lr_scale == "glorot":
        groups += [{"params": [p], "weight_decay": binary_decay, "lr_scale": glorot_lr_scale(p)} for p in binary]
    elif binary:
        groups.append({"params": binary, "weight_decay": binary_decay})
    return groups


def build_optimizer(model: nn.Module, cfg, binary_weights: list[nn.Parameter]) -> torch.optim.Optimizer:
    groups = param_groups(model, binary_weights, cfg.weight_decay, cfg.decay_binary,
                          cfg.get("latent_lr_scale", "none"))
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    # fused: one kernel per step for all parameters (CPU and CUDA); the per-tensor loop costs
    # several passes over every weight, as much as the network's own matmuls for an MLP.
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=_fusable(model))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               fused=_fusable(model))
    raise ValueError(f"optim={cfg.name}: no builder")  # unreachable after config validation


def _fusable(model: nn.Module) -> bool | None:
    params = list(model.parameters())
    devices = {p.device.type for p in params}
    ok = params and devices <= {"cpu", "cuda"} and len(devices) == 1 and all(p.is_floating_point() for p in params)
    return True if ok else None


def lr_factor(cfg, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warm-up over `warmup_epochs`, then: cosine from 1 to `min_lr_ratio` over the remaining
    steps (Loshchilov & Hutter 2017, without restarts); step: gamma^(milestones passed); constant: 1.
    """
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        progress = min(1.0, (step - warmup) / total)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer, cfg, steps_per_epoch: int, epochs: int):
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs))
