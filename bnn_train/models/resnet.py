"""ResNet-18 (ImageNet or CIFAR stem) and ResNet-20 for CIFAR.

He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition": ResNet-18 is sec. 4.1
(4 stages x 2 basic blocks, 64-512 channels); ResNet-20 is sec. 4.2 (3 stages x 3 blocks,
16/32/64 channels). Shortcuts that change shape use a 1x1 conv + BatchNorm projection (option B).
"""

from __future__ import annotations

from torch import Tensor, nn


def widen(channels: int, mult: float) -> int:
    """`channels` times the width multiplier (model.width_mult), at least 1: the "wider binary
    network" compensation (e.g. Zhu, Al-Ars & Hofstee 2019, "Binary Ensemble Neural Network", and
    the width studies in Bethge et al. 2019, "Back to Simplicity")."""
    return max(1, int(round(channels * mult)))


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """out = act(BN(conv(act(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, act_layer):
        super().__init__()
        self.conv1, self.bn1, self.act1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), act_layer(cout)
        self.conv2, self.bn2, self.act2 = conv3x3(cout, cout), nn.BatchNorm2d(cout), act_layer(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + shortcut)


class ResNet(nn.Module):
    per_conv_shortcut = False  # shortcuts span two convs (Bi-Real Net has one per conv)

    def __init__(self, stem: nn.Module, stem_channels: int, widths: list[int], blocks: list[int],
                 num_classes: int, act_layer, block=BasicBlock):
        """block(cin, cout, stride, act_layer): the residual block of every stage."""
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
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def imagenet_stem(cin: int, cout: int, act_layer) -> nn.Sequential:
    """7x7 stride-2 conv, BN, act, 3x3 stride-2 max-pool: /4 for 224-px inputs."""
    return nn.Sequential(nn.Conv2d(cin, cout, 7, 2, 3, bias=False), nn.BatchNorm2d(cout), act_layer(cout),
                         nn.MaxPool2d(3, 2, 1))


def cifar_stem(cin: int, cout: int, act_layer) -> nn.Sequential:
    """3x3 stride-1 conv, BN, act, no pooling: keeps 32-px inputs at full resolution."""
    return nn.Sequential(conv3x3(cin, cout), nn.BatchNorm2d(cout), act_layer(cout))


# Inputs below this size get the CIFAR stem under stem=auto.
SMALL_INPUT_PX = 64


def build_resnet18(cfg, in_channels: int, num_classes: int, image_size: int, act_layer) -> ResNet:
    kind = cfg.get("stem", "auto")
    if kind == "auto":
        kind = "cifar" if image_size < SMALL_INPUT_PX else "imagenet"
    m = cfg.get("width_mult", 1.0)
    stem = (cifar_stem if kind == "cifar" else imagenet_stem)(in_channels, widen(64, m), act_layer)
    return ResNet(stem, widen(64, m), [widen(c, m) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes, act_layer)


def build_resnet20(cfg, in_channels: int, num_classes: int, image_size: int, act_layer) -> ResNet:
    m = cfg.get("width_mult", 1.0)
    return ResNet(cifar_stem(in_channels, widen(16, m), act_layer), widen(16, m), [widen(c, m) for c in (16, 32, 64)],
                  [3, 3, 3], num_classes, act_layer)
