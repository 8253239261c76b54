"""Bi-Real Net-18 and -34: a real identity shortcut around every 3x3 conv.

Liu, Wu, Luo, Yang, Liu & Cheng 2018, "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With
Improved Representational Capability and Advanced Training Algorithm", sec. 3.1 and fig. 1: each
conv is its own block, out = act(BN(conv3x3(x)) + shortcut(x)), so the real-valued activations
before each sign reach the next block. With binary activations the block's input sign is applied
at the conv's input by `binarize_`; the paper has no nonlinearity after the add (act=identity).
Downsampling shortcuts are 2x2 average pool -> real 1x1 conv -> BN, as in the authors' PyTorch
release (liuzechun/Bi-Real-net). Stages: ResNet-18's [2,2,2,2] and ResNet-34's [3,4,6,3] basic blocks x 2 convs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bnn_train.errors import one_of
from bnn_train.models.base import MODELS, ModelConfig, widen
from bnn_train.models.resnet import STEMS, ResNet, cifar_stem, conv3x3, imagenet_stem, stem_kind


@dataclass
class BiRealConfig(ModelConfig):
    """stem: auto | imagenet | cifar; shortcut=false: no per-conv shortcuts and no downsample
    branches (the paper's ablation)."""

    name: str = "bireal18"
    stem: str = "auto"
    shortcut: bool = True

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "stem", *STEMS)

    def per_conv_shortcut(self) -> bool:
        return self.shortcut


class BiRealBlock(nn.Module):
    """out = act(BN(conv3x3(x)) + shortcut(x)); shortcut = x, or AvgPool2x2 -> conv1x1 -> BN when
    the shape changes; with shortcut=False, out = act(BN(conv3x3(x)))."""

    def __init__(self, cin: int, cout: int, stride: int, act_layer, shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.conv, self.bn = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.downsample = None
        if shortcut and (stride != 1 or cin != cout):
            # ceil_mode: matches the padded 3x3 conv's output size on odd inputs too.
            self.downsample = nn.Sequential(nn.AvgPool2d(2, stride, ceil_mode=True),
                                            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = act_layer(cout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        if self.shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act(out)


class BiRealNet(ResNet):
    """Real stem, stages of single-conv Bi-Real blocks, global average pool, real fc."""

    def __init__(self, stem: nn.Module, stem_channels: int, widths: list[int], convs: list[int],
                 num_classes: int, act_layer, shortcut: bool = True):
        super().__init__(stem, stem_channels, widths, convs, num_classes, act_layer,
                         block=lambda cin, cout, stride, act: BiRealBlock(cin, cout, stride, act, shortcut))


def _build_bireal(cfg: BiRealConfig, in_channels: int, num_classes: int, image_size: int, act_layer,
                  convs: list[int]) -> BiRealNet:
    kind, m = stem_kind(cfg.stem, image_size), cfg.width_mult
    stem = (cifar_stem if kind == "cifar" else imagenet_stem)(in_channels, widen(64, m), act_layer)
    return BiRealNet(stem, widen(64, m), [widen(c, m) for c in (64, 128, 256, 512)], convs, num_classes, act_layer,
                     shortcut=cfg.shortcut)


@MODELS.register("bireal18", BiRealConfig)
def build_bireal18(cfg: BiRealConfig, in_channels: int, num_classes: int, image_size: int, act_layer) -> BiRealNet:
    return _build_bireal(cfg, in_channels, num_classes, image_size, act_layer, [4, 4, 4, 4])


@MODELS.register("bireal34", BiRealConfig)
def build_bireal34(cfg: BiRealConfig, in_channels: int, num_classes: int, image_size: int, act_layer) -> BiRealNet:
    return _build_bireal(cfg, in_channels, num_classes, image_size, act_layer, [6, 8, 12, 6])
