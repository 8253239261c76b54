"""Architectures, written once in full precision, and a name -> builder registry.

A builder takes (cfg_model, in_channels, num_classes, image_size, act_layer) and returns an
nn.Module. Models register layers in forward order and name shortcut projections `downsample`, so
`binarize_` can apply its first/last/downsample policy without looking at shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnn_train.errors import ConfigError
from bnn_train.models.mlp import build_mlp
from bnn_train.models.resnet import build_resnet18, build_resnet20

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "resnet18": build_resnet18,
    "resnet20": build_resnet20,
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "hardtanh": nn.Hardtanh,
    "identity": nn.Identity,
}


def build_model(cfg_model, in_channels: int, num_classes: int, image_size: int, act: str) -> nn.Module:
    """Build the registered architecture `cfg_model.name` with activation `act`."""
    if cfg_model.name not in MODELS:
        raise ConfigError(f"model={cfg_model.name}: unknown model; choose one of: {', '.join(MODELS)}")
    if act not in ACTIVATIONS:
        raise ConfigError(f"model.act={act}: choose one of: auto, {', '.join(ACTIVATIONS)}")
    return MODELS[cfg_model.name](cfg_model, in_channels, num_classes, image_size, ACTIVATIONS[act])
