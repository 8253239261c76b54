"""Multi-layer perceptron of BinaryNet's MNIST experiments.

Hubara, Courbariaux et al. 2016, "Binarized Neural Networks", sec. 2.6: `depth` hidden layers of
`width` units, each Linear -> BatchNorm -> activation, and a BatchNorm on the logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnn_train.models.resnet import widen


class MLP(nn.Module):
    per_conv_shortcut = False

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, act_layer,
                 dropout: float = 0.0, final_bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width, bias=False),
                       nn.BatchNorm1d(width), act_layer(width)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width if depth else in_features, num_classes, bias=not final_bn)
        self.final_bn = nn.BatchNorm1d(num_classes) if final_bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.final_bn(self.classifier(self.features(x)))


def build_mlp(cfg, in_channels: int, num_classes: int, image_size: int, act_layer) -> MLP:
    return MLP(in_channels * image_size * image_size, num_classes, cfg.depth, widen(cfg.width, cfg.get("width_mult", 1.0)),
               act_layer,
               cfg.get("dropout", 0.0), cfg.get("final_bn", True))
