"""Turn a validated config into the objects the loop needs: device, model, binary weights."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnn_train.binarize import SCHEMES, Scheme, binarize_, binary_layers
from bnn_train.errors import ConfigError
from bnn_train.models import build_model, has_per_conv_shortcut


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU. cuda without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def scheme_of(cfg) -> Scheme:
    """The `method` config as its scheme object (the scheme's schema checks the values)."""
    keys = plain(cfg.method)
    return SCHEMES.lookup(keys.get("name"))(**keys)


def activation_for(cfg) -> str:
    """model.act=auto: the scheme's own activation if it has one (ReActNet: RPReLU; IR-Net: hardtanh);
    with binary activations, identity on Bi-Real-style models (the next conv's sign is the
    nonlinearity and the real shortcut must not be clipped) and hardtanh elsewhere (sign after ReLU
    would be +1 everywhere); ReLU for real activations."""
    if cfg.model.act != "auto":
        return cfg.model.act
    scheme = SCHEMES.lookup(cfg.method.name)
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
    binarized = binarize_(model, scheme_of(cfg), plain(cfg.ste), **(stage or {}))
    return model, binarized


def binary_weights(model: nn.Module) -> list[nn.Parameter]:
    return [layer.weight for _, layer in binary_layers(model)]
