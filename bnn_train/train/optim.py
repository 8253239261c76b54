"""Optimizers and per-step learning-rate schedules, built from the `optim` and `sched` groups."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, binary_weights: list[nn.Parameter], weight_decay: float,
                 decay_binary: bool) -> list[dict]:
    """Two groups so that weight decay can spare the latent weights of binarized layers: decay
    pulls them towards 0, where their sign flips on noise (Bi-Real Net and ReActNet train
    binary weights without it)."""
    binary_ids = {id(p) for p in binary_weights}
    binary = [p for p in model.parameters() if id(p) in binary_ids]
    real = [p for p in model.parameters() if id(p) not in binary_ids]
    groups = [{"params": real, "weight_decay": weight_decay}]
    if binary:
        groups.append({"params": binary, "weight_decay": weight_decay if decay_binary else 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg, binary_weights: list[nn.Parameter]) -> torch.optim.Optimizer:
    groups = param_groups(model, binary_weights, cfg.weight_decay, cfg.decay_binary)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"optim={cfg.name}: no builder")  # unreachable after config validation


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
