"""Binary conv and linear layers: the latent fp32 `weight` stays a plain Parameter; forward uses
Q_w(weight) and Q_a(input), so optimizers, checkpoints and clipping only ever see latent weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize.product import FusedBinaryConv2d, FusedBinaryLinear
from bnn_train.binarize.quantizers import ActivationQuantizer, IndicatorSTE
from bnn_train.binarize.scaling import SplitWeightBinarizer


class _BinaryMixin:
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None
    act_scale: nn.Module | None
    # Forward precision of the +-1 x +-1 product and precision of its gradients (`product.py`);
    # ("fp32", "fp32") is the plain float simulation.
    precision: str = "fp32"
    backward_precision: str = "fp32"

    def _set_quantizers(self, weight_quantizer, input_quantizer, act_scale):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.act_scale = act_scale
        self.affine: nn.Module | None = None  # AffineOutput when method.affine_output

    @property
    def binary_product(self) -> bool:
        """Inputs are signed and weights are alpha * sign(W) per output channel: the fused product applies."""
        return (isinstance(self.weight_quantizer, SplitWeightBinarizer)
                and isinstance(self.input_quantizer, ActivationQuantizer) and self.input_quantizer.outputs_sign
                and self._plain())

    def _plain(self) -> bool:
        return True

    def set_precision(self, forward: str, backward: str) -> None:
        self.precision, self.backward_precision = forward, backward

    def _use_product(self) -> bool:
        return (self.precision, self.backward_precision) != ("fp32", "fp32") and self.binary_product

    def _sign_input(self, x: Tensor) -> tuple[Tensor, float | None]:
        """(tensor to sign, clipped-STE bound) for the fused product: identity and clipped STEs run
        inside it; other estimators (ApproxSign, RSign, ...) run here and hand it +-1 values."""
        q = self.input_quantizer
        if isinstance(q, IndicatorSTE):
            return x, q.mask_bound
        return q(x), None

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def scaled(self, out: Tensor, x: Tensor, bias_shape: tuple[int, ...]) -> Tensor:
        """out * K(x) [* a + c] + b: the activation scale multiplies the binary product, then the
        affine output (if any), then the bias."""
        if self.act_scale is not None:
            out = out * self.act_scale(x)
        if self.affine is not None:
            out = self.affine(out, bias_shape)
        return out if self.bias is None else out + self.bias.view(bias_shape)

    @classmethod
    def from_float(cls, layer, weight_quantizer=None, input_quantizer=None, act_scale=None):
        """A binary layer that shares `layer`'s Parameters (no copy), made without allocating."""
        new = cls(**cls._ctor_args(layer), bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        new._set_quantizers(weight_quantizer, input_quantizer, act_scale)
        return new


class AffineOutput(nn.Module):
    """O = a * O_b + c with a learnable scale a (init 1) and shift c (init 0) per output channel.

    The affine form of a binary layer's output in ABC-Net (Lin, Zhao & Pan 2017, "Towards Accurate
    Binary Convolutional Neural Network", eq. 1-3, alpha_m * B_m + beta) with one binary base.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, out: Tensor, shape: tuple[int, ...]) -> Tensor:
        return torch.addcmul(self.shift.view(shape), out, self.scale.view(shape))


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """y = conv(Q_a(x), Q_w(W)) [* K(x)] + b."""

    @staticmethod
    def _ctor_args(c: nn.Conv2d) -> dict:
        return dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size,
                    stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                    padding_mode=c.padding_mode)

    def _plain(self) -> bool:  # what the fused conv handles
        return self.groups == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_product():
            x_in, bound = self._sign_input(x)
            out = FusedBinaryConv2d.apply(x_in, self.weight, bound, self.weight_quantizer,
                                          (self.stride, self.padding, self.dilation), self.precision,
                                          self.backward_precision)
        else:
            out = self._conv_forward(self.quantized_input(x), self.quantized_weight(), None)
        return self.scaled(out, x, (1, -1, 1, 1))


class BinaryLinear(_BinaryMixin, nn.Linear):
    """y = Q_a(x) @ Q_w(W)^T [* K(x)] + b."""

    @staticmethod
    def _ctor_args(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_product():
            x_in, bound = self._sign_input(x)
            out = FusedBinaryLinear.apply(x_in, self.weight, bound, self.weight_quantizer, self.precision,
                                          self.backward_precision)
        else:
            out = F.linear(self.quantized_input(x), self.quantized_weight())
        return self.scaled(out, x, (-1,))


BINARY_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}
