"""Turn a validated config into the objects the loop needs: device, model, binary weights."""

from __future__ import annotations

import torch
from torch import nn

from bnn_train.binarize import binarize_, binary_layers, get_scheme
from bnn_train.errors import ConfigError
from bnn_train.models import build_model, has_per_conv_shortcut


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU. cuda without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def activation_for(cfg) -> str:
    """model.act=auto: the scheme's own activation if it has one (ReActNet: RPReLU); with binary
    activations, identity on Bi-Real-style models (the next conv's sign is the nonlinearity and the
    real shortcut must not be clipped) and hardtanh elsewhere (sign after ReLU would be +1
    everywhere); ReLU for real activations."""
    if cfg.model.act != "auto":
        return cfg.model.act
    scheme = get_scheme(cfg.method.name)
    if scheme.act:
        return scheme.act
    if not scheme.binary_activations:
        return "relu"
    return "identity" if has_per_conv_shortcut(cfg.model) else "hardtanh"


def build_network(cfg, in_channels: int, num_classes: int, image_size: int,
                  stage: dict | None = None) -> tuple[nn.Module, list[str]]:
    """The model of `cfg.model`, binarized in place by `cfg.method` and `cfg.ste`.

    stage: a pretraining stage's `real_weights` / `input_act` (see `binarize_` and `stages.py`)."""
    model = build_model(cfg.model, in_channels, num_classes, image_size, activation_for(cfg))
    method = cfg.method
    ste_options = {k: v for k, v in cfg.ste.items() if k != "name"}
    binarized = binarize_(model, method.name, cfg.ste.name, ste_options=ste_options,
                          keep_first_real=method.keep_first_real, keep_last_real=method.keep_last_real,
                          keep_downsample_real=method.keep_downsample_real,
                          act_scale=method.get("act_scale", "none"), stochastic=method.get("stochastic", False),
                          magnitude_aware=method.get("magnitude_aware", True),
                          weight_scale=method.get("weight_scale", "auto"),
                          scale_granularity=method.get("weight_scale_granularity", "channel"),
                          affine_output=method.get("affine_output", False), act_levels=method.get("act_levels", "pm1"),
                          act_stochastic=method.get("act_stochastic", False),
                          **(stage or {}))
    return model, binarized


def binary_weights(model: nn.Module) -> list[nn.Parameter]:
    return [layer.weight for _, layer in binary_layers(model)]

