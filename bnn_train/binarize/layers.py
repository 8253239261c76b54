"""Binary conv and linear layers: the latent fp32 `weight` stays a plain Parameter; forward uses
Q_w(weight) and Q_a(input), so optimizers, checkpoints and clipping only ever see latent weights."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _BinaryMixin:
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None
    act_scale: nn.Module | None

    def _set_quantizers(self, weight_quantizer, input_quantizer, act_scale):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.act_scale = act_scale

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def scaled(self, out: Tensor, x: Tensor, bias_shape: tuple[int, ...]) -> Tensor:
        """out * K(x) + b: the activation scale multiplies the binary product, before the bias."""
        if self.act_scale is not None:
            out = out * self.act_scale(x)
        return out if self.bias is None else out + self.bias.view(bias_shape)

    @classmethod
    def from_float(cls, layer, weight_quantizer=None, input_quantizer=None, act_scale=None):
        """A binary layer that shares `layer`'s Parameters (no copy), made without allocating."""
        new = cls(**cls._ctor_args(layer), bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        new._set_quantizers(weight_quantizer, input_quantizer, act_scale)
        return new


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """y = conv(Q_a(x), Q_w(W)) [* K(x)] + b."""

    @staticmethod
    def _ctor_args(c: nn.Conv2d) -> dict:
        return dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                    stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                    padding_mode=c.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(self.quantized_input(x), self.quantized_weight(), None)
        return self.scaled(out, x, (1, -1, 1, 1))


class BinaryLinear(_BinaryMixin, nn.Linear):
    """y = Q_a(x) @ Q_w(W)^T [* K(x)] + b."""

    @staticmethod
    def _ctor_args(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaled(F.linear(self.quantized_input(x), self.quantized_weight()), x, (-1,))


BINARY_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}
