"""Binary conv and linear layers: the latent fp32 `weight` stays a plain Parameter; forward uses
Q_w(weight) and Q_a(input), so optimizers, checkpoints and clipping only ever see latent weights."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _BinaryMixin:
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    def _set_quantizers(self, weight_quantizer, input_quantizer):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def from_float(cls, layer, weight_quantizer=None, input_quantizer=None):
        """A binary layer that shares `layer`'s Parameters (no copy), made without allocating."""
        new = cls(**cls._ctor_args(layer), bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        new._set_quantizers(weight_quantizer, input_quantizer)
        return new


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """y = conv(Q_a(x), Q_w(W)) + b."""

    @staticmethod
    def _ctor_args(c: nn.Conv2d) -> dict:
        return dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                    stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                    padding_mode=c.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class BinaryLinear(_BinaryMixin, nn.Linear):
    """y = Q_a(x) @ Q_w(W)^T + b."""

    @staticmethod
    def _ctor_args(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


BINARY_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}
