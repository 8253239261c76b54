"""The model registry, the keys every model config shares, and the activations a model can use.

A model is a builder `build(cfg, in_channels, num_classes, image_size, act_layer) -> nn.Module`
registered with `@MODELS.register(name, ConfigClass)` in any module of this package, plus
configs/model/NAME.yaml. `act_layer(channels)` makes one activation (per-channel ones such as
RPReLU need the count). Two rules let `binarize_` apply its layer policy without shape checks
(tests/test_models.py checks both for every registered model): register Conv2d/Linear layers in
forward order (the first and last are the network's input and output layers), and put shortcut
projections under a module named `downsample`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bnn_train.errors import one_of, require
from bnn_train.models.activations import RPReLU
from bnn_train.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model")

# name -> factory(channels) -> nn.Module
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda channels: nn.ReLU(inplace=True),
    "hardtanh": lambda channels: nn.Hardtanh(),
    "identity": lambda channels: nn.Identity(),
    "rprelu": RPReLU,
}


@dataclass
class ModelConfig:
    """act: auto picks from the method (`train.setup.activation_for`); width_mult: channels (hidden
    units) x this, the "wider binary network" compensation."""

    name: str = "???"
    act: str = "auto"
    width_mult: float = 1.0

    def __post_init__(self):
        one_of(self, "act", "auto", *ACTIVATIONS)
        require(self.width_mult > 0, "width_mult", self.width_mult, "must be > 0")

    def per_conv_shortcut(self) -> bool:
        """Whether the network has a real shortcut around every conv (Bi-Real Net style)."""
        return False


def widen(channels: int, mult: float) -> int:
    """`channels` times the width multiplier (model.width_mult), at least 1: the "wider binary
    network" compensation (e.g. Zhu, Al-Ars & Hofstee 2019, "Binary Ensemble Neural Network", and
    the width studies in Bethge et al. 2019, "Back to Simplicity")."""
    return max(1, int(round(channels * mult)))
