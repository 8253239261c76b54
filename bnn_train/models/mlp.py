"""Multi-layer perceptron of BinaryNet's MNIST experiments.

Hubara, Courbariaux et al. 2016, "Binarized Neural Networks", sec. 2.6: `depth` hidden layers of
`width` units, each Linear -> BatchNorm -> activation, and a BatchNorm on the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bnn_train.errors import require
from bnn_train.models.base import MODELS, ModelConfig, widen


@dataclass
class MLPConfig(ModelConfig):
    """depth: hidden layers (0: a linear classifier); final_bn: BatchNorm on the logits, as in BinaryNet."""

    name: str = "mlp"
    depth: int = 3
    width: int = 1024
    dropout: float = 0.0
    final_bn: bool = True

    def __post_init__(self):
        super().__post_init__()
        require(self.depth >= 0, "depth", self.depth, "must be >= 0")
        require(self.width >= 1, "width", self.width, "must be >= 1")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")


class MLP(nn.Module):
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


@MODELS.register("mlp", MLPConfig)
def build_mlp(cfg: MLPConfig, in_channels: int, num_classes: int, image_size: int, act_layer) -> MLP:
    return MLP(in_channels * image_size * image_size, num_classes, cfg.depth, widen(cfg.width, cfg.width_mult),
               act_layer, cfg.dropout, cfg.final_bn)
