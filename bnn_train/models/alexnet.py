"""AlexNet with BatchNorm, in the standard or XNOR-Net layer order.

Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep Convolutional Neural
Networks": conv11/4-96, pool, conv5-256, pool, conv3-384, conv3-384, conv3-256, pool, fc-4096,
fc-4096, fc-classes (max-pools 3/2; a 6x6 adaptive average pool makes the fc input size independent
of the image size). The CIFAR variant (inputs < 64 px) uses 3x3 convs with the same widths, 2x2
max-pools after conv1, conv2 and conv5, and fc_width-wide hidden fc layers.

block_order=standard: every layer but the last is layer -> BN -> act (-> pool).
block_order=xnor (Rastegari et al. 2016, "XNOR-Net", sec. 3.3 and fig. 3): every layer after the
first is BN -> act -> layer (-> pool), so the sign that `binarize_` applies at the layer's input
comes right after BatchNorm, and max-pooling acts on the conv's real-valued output rather than on
binary values (which would be mostly +1). The first conv stays conv -> BN -> act -> pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bnn_train.errors import ConfigError, one_of, require
from bnn_train.models.base import MODELS, ModelConfig, widen
from bnn_train.models.resnet import stem_kind

# (out_channels, kernel, stride, padding, max-pool after) per conv
IMAGENET_CONVS = [(96, 11, 4, 2, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
                  (256, 3, 1, 1, True)]
CIFAR_CONVS = [(96, 3, 1, 1, True), (256, 3, 1, 1, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
               (256, 3, 1, 1, True)]
DEFAULT_FC_WIDTH = {"imagenet": 4096, "cifar": 1024}
VARIANTS, BLOCK_ORDERS = ("auto", "imagenet", "cifar"), ("standard", "xnor")


@dataclass
class AlexNetConfig(ModelConfig):
    """variant: auto (cifar below 64 px) | imagenet | cifar; block_order: standard | xnor;
    fc_width: hidden fc width, auto: 4096 (imagenet), 1024 (cifar)."""

    name: str = "alexnet"
    variant: str = "auto"
    block_order: str = "standard"
    fc_width: Any = "auto"

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "variant", *VARIANTS)
        one_of(self, "block_order", *BLOCK_ORDERS)
        require(self.fc_width == "auto" or (type(self.fc_width) is int and self.fc_width >= 1), "fc_width",
                self.fc_width, "must be auto or an integer >= 1")


def _block(layer: nn.Module, bn_in: int, bn_out: int, first: bool, last: bool, xnor: bool, act_layer,
           pool: nn.Module | None) -> nn.Sequential:
    """One layer with its BN and activation in the requested order; 2-d or 1-d BN by layer type."""
    norm = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    if xnor and not first:
        mods = [norm(bn_in), act_layer(bn_in), layer]
    elif last:
        mods = [layer]
    else:
        mods = [layer, norm(bn_out), act_layer(bn_out)]
    return nn.Sequential(*mods, *([pool] if pool is not None else []))


class AlexNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, variant: str, fc_width: int,
                 block_order: str, act_layer, width_mult: float = 1.0):
        super().__init__()
        xnor = block_order == "xnor"
        imagenet = variant == "imagenet"
        blocks, cin = [], in_channels
        for i, (cout, k, s, p, pooled) in enumerate(IMAGENET_CONVS if imagenet else CIFAR_CONVS):
            cout = widen(cout, width_mult)
            pool = (nn.MaxPool2d(3, 2) if imagenet else nn.MaxPool2d(2, 2)) if pooled else None
            blocks.append(_block(nn.Conv2d(cin, cout, k, s, p, bias=False), cin, cout, i == 0, False, xnor,
                                 act_layer, pool))
            cin = cout
        self.features = nn.Sequential(*blocks)
        if imagenet:
            self.pool, side = nn.AdaptiveAvgPool2d(6), 6
        else:
            self.pool, side = nn.Identity(), image_size // 8  # three 2x2 max-pools
            if side < 1:
                raise ConfigError(f"model.variant=cifar: needs images of at least 8 px, got {image_size}")
        widths = [cin * side * side, fc_width, fc_width, num_classes]
        self.classifier = nn.Sequential(*[
            # only the last fc has a bias: a BN follows every other one (xnor: the next block's)
            _block(nn.Linear(widths[i], widths[i + 1], bias=i == 2), widths[i], widths[i + 1], False, i == 2,
                   xnor, act_layer, None)
            for i in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("alexnet", AlexNetConfig)
def build_alexnet(cfg: AlexNetConfig, in_channels: int, num_classes: int, image_size: int, act_layer) -> AlexNet:
    variant = stem_kind(cfg.variant, image_size)
    fc_width = DEFAULT_FC_WIDTH[variant] if cfg.fc_width == "auto" else cfg.fc_width
    m = cfg.width_mult
    return AlexNet(in_channels, num_classes, image_size, variant, widen(int(fc_width), m), cfg.block_order,
                   act_layer, m)
