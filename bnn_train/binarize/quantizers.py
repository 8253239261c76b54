"""Sign quantizers with straight-through estimators (STEs), registered by name in `STES`.

Every estimator computes the same forward, sign(x) with sign(0) = +1, and differs only in the
pseudo-gradient that backward uses in place of sign's derivative (zero almost everywhere).
A new estimator is a `SignSTE` subclass decorated with `@STES.register(name, schema)` (schema: the
dataclass of its `ste` config keys) plus configs/ste/NAME.yaml.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from bnn_train.errors import require
from bnn_train.registry import Registry


def sign(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} with sign(0) = +1 (torch.sign would give 0, a third value).

    Computed as copysign(1, x + 0), where x + 0 turns -0.0 into +0.0: one fused pass, several
    times faster on the CPU than torch.where with a mask."""
    return torch.ones_like(x).copysign_(x + 0.0)


class _SignSTE(torch.autograd.Function):
    """forward: sign(x); backward: grad_out * pseudo_grad(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, pseudo_grad):
        ctx.save_for_backward(x)
        ctx.pseudo_grad = pseudo_grad
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.pseudo_grad(x), None


def sign_int8(x: Tensor) -> Tensor:
    """sign(x) as int8 in {-1, +1}, sign(0) = +1 (torch.sign's 0 is moved to +1 in int8, which is
    cheaper than building the sign from a comparison mask)."""
    s = x.sign().to(torch.int8)
    return s.add_(s == 0)


class _MaskedSignSTE(torch.autograd.Function):
    """sign(x) for estimators whose pseudo-gradient is an indicator: backward is grad_out * 1{|x| <= bound}
    (bound None: grad_out). Saves a bool mask (1 byte per element) or nothing, instead of fp32 x."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float | None):
        ctx.bound = bound
        if bound is not None:
            ctx.save_for_backward(x.abs() <= bound)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.bound is None:
            return grad_out, None
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None


class ActivationQuantizer(nn.Module):
    """What a binarized layer applies to its input. `outputs_sign`: the forward values are exactly
    +-1, so the fused exact products (`product.py`) may take them."""

    outputs_sign: ClassVar[bool] = False


class SignSTE(ActivationQuantizer, abc.ABC):
    """sign(x) forward, `pseudo_grad(x)` as d sign/dx in backward."""

    name: ClassVar[str] = "base"
    outputs_sign = True

    @abc.abstractmethod
    def pseudo_grad(self, x: Tensor) -> Tensor:
        ...

    def forward(self, x: Tensor) -> Tensor:
        return _SignSTE.apply(x, self.pseudo_grad)


class IndicatorSTE(SignSTE):
    """Estimators whose pseudo-gradient is the indicator 1{|x| <= mask_bound} (None: always 1): the
    fused products apply them inside the product and save a bool mask instead of x."""

    mask_bound: ClassVar[float | None] = None

    def pseudo_grad(self, x: Tensor) -> Tensor:
        if self.mask_bound is None:
            return torch.ones_like(x)
        return (x.abs() <= self.mask_bound).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _MaskedSignSTE.apply(x, self.mask_bound)


@dataclass
class EstimatorConfig:
    """Keys of an `ste` option without parameters."""

    name: str = "???"


STES: Registry[type[SignSTE]] = Registry("ste", "estimator")


@STES.register("identity", EstimatorConfig)
class IdentitySTE(IndicatorSTE):
    """Plain straight-through estimator: d sign/dx := 1.

    Bengio, Léonard & Courville 2013, "Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation"; the weight estimator of BinaryConnect (Courbariaux et
    al. 2015).
    """

    name = "identity"
    mask_bound = None


@STES.register("clipped", EstimatorConfig)
class ClippedSTE(IndicatorSTE):
    """STE with gradient cancellation: d sign/dx := 1{|x| <= 1} (the derivative of Hardtanh).

    Hubara, Courbariaux et al. 2016, "Binarized Neural Networks" (BinaryNet), eq. 4.
    """

    name = "clipped"
    mask_bound = 1.0


@STES.register("approx_sign", EstimatorConfig)
class ApproxSignSTE(SignSTE):
    """Bi-Real Net's ApproxSign: the derivative of a piecewise-quadratic approximation of sign,
        d sign/dx := 2 + 2x on [-1, 0),  2 - 2x on [0, 1),  0 elsewhere.

    Liu et al. 2018, "Bi-Real Net", sec. 3.2, eq. 4.
    """

    name = "approx_sign"

    def pseudo_grad(self, x: Tensor) -> Tensor:
        return (2 - 2 * x.abs()).clamp_(min=0)  # 2 - 2|x| on (-1, 1), which is <= 0 outside


@dataclass
class SwishSignConfig:
    name: str = "swish_sign"
    beta: float = 5.0

    def __post_init__(self):
        require(self.beta > 0, "beta", self.beta, "must be > 0")


@STES.register("swish_sign", SwishSignConfig)
class SwishSignSTE(SignSTE):
    """SwishSign: the derivative of SS_b(x) = 2 sigma(b x)(1 + b x (1 - sigma(b x))) - 1,
        d sign/dx := b (2 - b x tanh(b x / 2)) / (1 + cosh(b x)).

    Darabi et al. 2018, "BNN+: Improved Binary Network Training", eq. 6 (larq's SwishSign).
    """

    name = "swish_sign"

    def __init__(self, beta: float = SwishSignConfig.beta):
        super().__init__()
        self.beta = beta

    def pseudo_grad(self, x: Tensor) -> Tensor:
        bx = self.beta * x
        return self.beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class EpochScheduled(abc.ABC):
    """A quantizer whose behaviour follows the training progress: the trainer calls
    set_epoch(epoch, epochs) before every epoch (0-based), so a resumed run continues the schedule."""

    @abc.abstractmethod
    def set_epoch(self, epoch: int, epochs: int) -> None:
        ...


class StochasticSign(ActivationQuantizer):
    """BinaryNet's stochastic activations: +1 with probability hard_sigmoid(x) = clip((x + 1) / 2, 0, 1),
    else -1, while training; deterministic sign(x) in eval mode.

    Hubara, Courbariaux et al. 2016, "Binarized Neural Networks", eq. 2. Sampled as sign(x - u),
    u ~ U(-1, 1), since P(x - u >= 0) = clip((x + 1) / 2, 0, 1); the gradient reaches x through
    `ste` at x - u.
    """

    outputs_sign = True

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.ste(x)
        return self.ste(x - (torch.rand_like(x) * 2 - 1))


class ZeroOneSign(ActivationQuantizer):
    """{0, 1} activations: a = (q(x) + 1) / 2 for a +-1 quantizer q, gradient q'/2.

    For a layer with weights W this gives the identity W . a = (W . q(x) + W . 1) / 2: a {0, 1}
    layer is the +-1 layer plus a per-output offset (half its weight row sum), at half the scale.
    (The 0/1 encoding of activations in DoReFa-Net, Zhou et al. 2016, at 1 bit.)
    """

    outputs_sign = False

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        return (self.quantizer(x) + 1) * 0.5


class ThresholdSign(ActivationQuantizer):
    """ReActNet's RSign: sign(x_c - beta_c) with a learnable threshold beta per input channel c.

    Liu et al. 2020, "ReActNet", eq. 2. The gradient reaches x and beta through `ste` at x - beta:
    dL/dbeta_c = -sum over channel c of g * ste'(x - beta).
    """

    outputs_sign = True

    def __init__(self, channels: int, ste: SignSTE):
        super().__init__()
        self.ste = ste
        self.threshold = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.ste(x - self.threshold.view(shape))


def build_ste(name: str, **options) -> SignSTE:
    """Instantiate the estimator registered under `name` with its options (e.g. beta for swish_sign)."""
    return STES.lookup(name)(**options)


def ste_from_config(node) -> SignSTE:
    """The estimator of an `ste` config node: its `name` and its options."""
    return build_ste(node["name"], **{k: v for k, v in node.items() if k != "name"})
