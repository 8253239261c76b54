"""Architectures, written once in full precision, in a name -> builder registry (`base.py`).

Every module in this folder is imported here, so a model registers itself by being a file in it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnn_train.errors import ConfigError, FieldError
from bnn_train.models.base import ACTIVATIONS, MODELS, ModelConfig, widen
from bnn_train.registry import import_submodules

import_submodules(__name__)

__all__ = ["ACTIVATIONS", "MODELS", "ModelConfig", "build_model", "has_per_conv_shortcut", "model_config", "widen"]


def model_config(cfg_model) -> ModelConfig:
    """The typed config of `cfg_model` (its schema checks the values)."""
    keys = OmegaConf.to_container(cfg_model, resolve=True) if isinstance(cfg_model, DictConfig) else dict(cfg_model)
    MODELS.lookup(keys.get("name"))
    try:
        return MODELS.schemas[keys["name"]](**keys)
    except FieldError as err:
        raise err.at("model") from None


def build_model(cfg_model, in_channels: int, num_classes: int, image_size: int, act: str) -> nn.Module:
    """Build the registered architecture `cfg_model.name` with activation `act`."""
    builder = MODELS.lookup(cfg_model.get("name"))
    if act not in ACTIVATIONS:
        raise ConfigError(f"model.act={act}: choose one of: auto, {', '.join(ACTIVATIONS)}")
    return builder(model_config(cfg_model), in_channels, num_classes, image_size, ACTIVATIONS[act])


def has_per_conv_shortcut(cfg_model) -> bool:
    """Whether `cfg_model` builds a network with a real shortcut around every conv (Bi-Real Net)."""
    return model_config(cfg_model).per_conv_shortcut()
