"""Turn a validated config into the objects the loop needs: device, model, binary weights."""

from __future__ import annotations

import torch
from torch import nn

from bnn_train.binarize import binarize_, binary_layers, get_scheme
from bnn_train.errors import ConfigError
from bnn_train.models import build_model


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU. cuda without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def activation_for(cfg) -> str:
    """model.act=auto: hardtanh when activations are binarized (sign after ReLU would be +1
    everywhere; Hardtanh's gradient is the clipped STE's window), ReLU otherwise."""
    if cfg.model.act != "auto":
        return cfg.model.act
    return "hardtanh" if get_scheme(cfg.method.name).binary_activations else "relu"


def build_network(cfg, in_channels: int, num_classes: int, image_size: int) -> tuple[nn.Module, list[str]]:
    """The model of `cfg.model`, binarized in place by `cfg.method` and `cfg.ste`."""
    model = build_model(cfg.model, in_channels, num_classes, image_size, activation_for(cfg))
    method = cfg.method
    ste_options = {k: v for k, v in cfg.ste.items() if k != "name"}
    binarized = binarize_(model, method.name, cfg.ste.name, ste_options=ste_options,
                          keep_first_real=method.keep_first_real, keep_last_real=method.keep_last_real,
                          keep_downsample_real=method.keep_downsample_real,
                          act_scale=method.get("act_scale", "none"), stochastic=method.get("stochastic", False))
    return model, binarized


def binary_weights(model: nn.Module) -> list[nn.Parameter]:
    return [layer.weight for _, layer in binary_layers(model)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(binary, real) parameter counts: binary = latent weights of binarized layers."""
    binary = sum(p.numel() for p in binary_weights(model))
    return binary, sum(p.numel() for p in model.parameters()) - binary
