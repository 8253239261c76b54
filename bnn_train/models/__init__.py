"""Architectures, written once in full precision, and a name -> builder registry.

A builder takes (cfg_model, in_channels, num_classes, image_size, act_layer) and returns an
nn.Module; `act_layer(channels)` makes one activation for a tensor with that many channels
(per-channel activations such as RPReLU need the count; the others ignore it). Models register
layers in forward order and name shortcut projections `downsample`, so `binarize_` can apply its
first/last/downsample policy without looking at shapes. Each model class says in
`per_conv_shortcut` whether every conv has its own real shortcut (Bi-Real Net style).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnn_train.errors import ConfigError
from bnn_train.models.activations import RPReLU
from bnn_train.models.alexnet import build_alexnet
from bnn_train.models.bireal import build_bireal18, build_bireal34
from bnn_train.models.mlp import build_mlp
from bnn_train.models.resnet import build_resnet18, build_resnet20

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "resnet18": build_resnet18,
    "resnet20": build_resnet20,
    "alexnet": build_alexnet,
    "bireal18": build_bireal18,
    "bireal34": build_bireal34,
}

# Models whose built class has per_conv_shortcut = True (unless model.shortcut=false), so that a
# config can be checked before anything is built; tests/test_bireal.py keeps the two in step.
PER_CONV_SHORTCUT = {"bireal18", "bireal34"}

# name -> factory(channels) -> nn.Module
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda channels: nn.ReLU(inplace=True),
    "hardtanh": lambda channels: nn.Hardtanh(),
    "identity": lambda channels: nn.Identity(),
    "rprelu": RPReLU,
}


def build_model(cfg_model, in_channels: int, num_classes: int, image_size: int, act: str) -> nn.Module:
    """Build the registered architecture `cfg_model.name` with activation `act`."""
    if cfg_model.name not in MODELS:
        raise ConfigError(f"model={cfg_model.name}: unknown model; choose one of: {', '.join(MODELS)}")
    if act not in ACTIVATIONS:
        raise ConfigError(f"model.act={act}: choose one of: auto, {', '.join(ACTIVATIONS)}")
    return MODELS[cfg_model.name](cfg_model, in_channels, num_classes, image_size, ACTIVATIONS[act])


def has_per_conv_shortcut(cfg_model) -> bool:
    """Whether `cfg_model` builds a network with a real shortcut around every conv (Bi-Real Net,
    or a ResNet with model.shortcut=per_conv)."""
    if cfg_model.get("shortcut") == "per_conv":
        return True
    return cfg_model.get("name") in PER_CONV_SHORTCUT and cfg_model.get("shortcut", True) is True
