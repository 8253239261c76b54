"""ResNet-18 (ImageNet or CIFAR stem) and ResNet-20 for CIFAR.

He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition": ResNet-18 is sec. 4.1
(4 stages x 2 basic blocks, 64-512 channels); ResNet-20 is sec. 4.2 (3 stages x 3 blocks,
16/32/64 channels).

Two choices shape a ResNet for 1-bit training (`model.shortcut`, `model.downsample`):
- shortcut=block: He et al.'s basic block, one shortcut around two convs;
  shortcut=per_conv: a real shortcut around every conv, h = act(BN(conv1(x)) + shortcut(x)),
  out = act(BN(conv2(h)) + h) -- Liu et al. 2018, "Bi-Real Net", sec. 3.1, and the 1W1A CIFAR
  ResNet-20 of Qin et al. 2020, "IR-Net" (and RBNN, ReCU after it).
- downsample=conv: shortcuts that change shape are a 1x1 conv + BatchNorm (He et al.'s option B);
  downsample=option_a: stride-2 subsampling and zero-padded channels, no parameters (option A,
  sec. 4.2, the CIFAR ResNets' own: 0.27 M parameters for ResNet-20).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.errors import one_of
from bnn_train.models.base import MODELS, ModelConfig, widen

STEMS = ("auto", "imagenet", "cifar")


@dataclass
class ResNet20Config(ModelConfig):
    """shortcut: block | per_conv; downsample: conv | option_a (module docstring); head_bn: a
    BatchNorm1d on the pooled features before the classifier (IR-Net's CIFAR ResNets)."""

    name: str = "resnet20"
    shortcut: str = "block"
    downsample: str = "conv"
    head_bn: bool = False

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "shortcut", *SHORTCUTS)
        one_of(self, "downsample", *DOWNSAMPLES)

    def per_conv_shortcut(self) -> bool:
        return self.shortcut == "per_conv"


@dataclass
class ResNet18Config(ResNet20Config):
    """stem: auto (cifar below 64 px) | imagenet (7x7/2 conv + max-pool) | cifar (3x3/1 conv)."""

    name: str = "resnet18"
    stem: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "stem", *STEMS)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: x[:, :, ::stride, ::stride] with zero channels added on both sides up
    to `cout` (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


DOWNSAMPLES = ("conv", "option_a")


def downsample_for(cin: int, cout: int, stride: int, kind: str) -> nn.Module | None:
    """The shortcut of a block whose shape changes (None when it does not)."""
    if stride == 1 and cin == cout:
        return None
    if kind == "option_a":
        return ZeroPadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """out = act(BN(conv(act(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, act_layer, downsample: str = "conv"):
        super().__init__()
        self.conv1, self.bn1, self.act1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), act_layer(cout)
        self.conv2, self.bn2, self.act2 = conv3x3(cout, cout), nn.BatchNorm2d(cout), act_layer(cout)
        self.downsample = downsample_for(cin, cout, stride, downsample)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + shortcut)


class PerConvBlock(BasicBlock):
    """h = act(BN(conv1(x)) + shortcut(x)); out = act(BN(conv2(h)) + h): a real shortcut around
    each conv, so the real activations before every sign reach the next conv (IR-Net's 1W1A block)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.act1(self.bn1(self.conv1(x)) + shortcut)
        return self.act2(self.bn2(self.conv2(h)) + h)


SHORTCUTS = {"block": BasicBlock, "per_conv": PerConvBlock}


class ResNet(nn.Module):
    def __init__(self, stem: nn.Module, stem_channels: int, widths: list[int], blocks: list[int],
                 num_classes: int, act_layer, block=BasicBlock, head_bn: bool = False):
        """block(cin, cout, stride, act_layer): the residual block of every stage; head_bn: a
        BatchNorm1d on the pooled features before the classifier (IR-Net's CIFAR ResNets)."""
        super().__init__()
        self.stem = stem
        stages, cin = [], stem_channels
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[block(cin if j == 0 else width, width, stride if j == 0 else 1, act_layer)
                                          for j in range(n)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_bn = nn.BatchNorm1d(cin) if head_bn else None
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(features if self.head_bn is None else self.head_bn(features))


def imagenet_stem(cin: int, cout: int, act_layer) -> nn.Sequential:
    """7x7 stride-2 conv, BN, act, 3x3 stride-2 max-pool: /4 for 224-px inputs."""
    return nn.Sequential(nn.Conv2d(cin, cout, 7, 2, 3, bias=False), nn.BatchNorm2d(cout), act_layer(cout),
                         nn.MaxPool2d(3, 2, 1))


def cifar_stem(cin: int, cout: int, act_layer) -> nn.Sequential:
    """3x3 stride-1 conv, BN, act, no pooling: keeps 32-px inputs at full resolution."""
    return nn.Sequential(conv3x3(cin, cout), nn.BatchNorm2d(cout), act_layer(cout))


# Inputs below this size get the CIFAR stem under stem=auto.
SMALL_INPUT_PX = 64


def stem_kind(stem: str, image_size: int) -> str:
    if stem == "auto":
        return "cifar" if image_size < SMALL_INPUT_PX else "imagenet"
    return stem


@MODELS.register("resnet18", ResNet18Config)
def build_resnet18(cfg: ResNet18Config, in_channels: int, num_classes: int, image_size: int, act_layer) -> ResNet:
    kind, m = stem_kind(cfg.stem, image_size), cfg.width_mult
    stem = (cifar_stem if kind == "cifar" else imagenet_stem)(in_channels, widen(64, m), act_layer)
    return _resnet(cfg, stem, widen(64, m), [widen(c, m) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes,
                   act_layer)


@MODELS.register("resnet20", ResNet20Config)
def build_resnet20(cfg: ResNet20Config, in_channels: int, num_classes: int, image_size: int, act_layer) -> ResNet:
    m = cfg.width_mult
    return _resnet(cfg, cifar_stem(in_channels, widen(16, m), act_layer), widen(16, m),
                   [widen(c, m) for c in (16, 32, 64)], [3, 3, 3], num_classes, act_layer)


def _resnet(cfg: ResNet20Config, stem, stem_channels, widths, blocks, num_classes, act_layer) -> ResNet:
    block_cls = SHORTCUTS[cfg.shortcut]
    return ResNet(stem, stem_channels, widths, blocks, num_classes, act_layer,
                  block=lambda cin, cout, stride, act: block_cls(cin, cout, stride, act, cfg.downsample),
                  head_bn=cfg.head_bn)
