"""Sign quantizers with straight-through estimators (STEs), looked up by name.

Every quantizer computes the same forward, sign(x) with sign(0) = +1, and differs only in the
pseudo-gradient that backward uses in place of sign's derivative (zero almost everywhere).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from bnn_train.errors import ConfigError


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


class SignSTE(nn.Module):
    """Base class: sign(x) forward, `pseudo_grad(x)` as d sign/dx in backward."""

    name = "base"
    outputs_sign = True  # forward values are exactly +-1

    def pseudo_grad(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return _SignSTE.apply(x, self.pseudo_grad)


class IdentitySTE(SignSTE):
    """Plain straight-through estimator: d sign/dx := 1.

    Bengio, Léonard & Courville 2013, "Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation"; the weight estimator of BinaryConnect (Courbariaux et
    al. 2015).
    """

    name = "identity"

    def pseudo_grad(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)

    mask_bound = None  # the pseudo-gradient is 1{|x| <= mask_bound}; None: always 1

    def forward(self, x: Tensor) -> Tensor:
        return _MaskedSignSTE.apply(x, None)


class ClippedSTE(SignSTE):
    """STE with gradient cancellation: d sign/dx := 1{|x| <= 1} (the derivative of Hardtanh).

    Hubara, Courbariaux et al. 2016, "Binarized Neural Networks" (BinaryNet), eq. 4.
    """

    name = "clipped"

    def pseudo_grad(self, x: Tensor) -> Tensor:
        return (x.abs() <= 1).to(x.dtype)

    mask_bound = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return _MaskedSignSTE.apply(x, self.mask_bound)


class ApproxSignSTE(SignSTE):
    """Bi-Real Net's ApproxSign: the derivative of a piecewise-quadratic approximation of sign,
        d sign/dx := 2 + 2x on [-1, 0),  2 - 2x on [0, 1),  0 elsewhere.

    Liu et al. 2018, "Bi-Real Net", sec. 3.2, eq. 4.
    """

    name = "approx_sign"

    def pseudo_grad(self, x: Tensor) -> Tensor:
        return (2 - 2 * x.abs()).clamp_(min=0)  # 2 - 2|x| on (-1, 1), which is <= 0 outside


class SwishSignSTE(SignSTE):
    """SwishSign: the derivative of SS_b(x) = 2 sigma(b x)(1 + b x (1 - sigma(b x))) - 1,
        d sign/dx := b (2 - b x tanh(b x / 2)) / (1 + cosh(b x)).

    Darabi et al. 2018, "BNN+: Improved Binary Network Training", eq. 6 (larq's SwishSign).
    """

    name = "swish_sign"

    def __init__(self, beta: float = 5.0):
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


class EDESTE(SignSTE, EpochScheduled):
    """IR-Net's Error Decay Estimator: d sign/dx := k t (1 - tanh^2(t x)), the derivative of
    k tanh(t x), with
        t = 10^(log10 t_min + (log10 t_max - log10 t_min) e / E),   k = max(1 / t, 1)
    at epoch e of E: close to the identity STE early (small t, k t = 1 near 0), close to sign's own
    derivative late (t = t_max, a narrow peak of height t).

    Qin et al. 2020, "Forward and Backward Information Retention for Accurate Binary Neural
    Networks" (IR-Net), sec. 3.2, eq. 11-12; t_min = 1e-3, t_max = 10 as in the authors' CIFAR code.
    """

    name = "ede"

    def __init__(self, t_min: float = 1e-3, t_max: float = 10.0):
        super().__init__()
        if not 0 < t_min <= t_max:
            raise ConfigError(f"ste.t_min={t_min}, ste.t_max={t_max}: need 0 < t_min <= t_max")
        self.t_min, self.t_max = t_min, t_max
        self.set_epoch(0, 1)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        lo, hi = math.log10(self.t_min), math.log10(self.t_max)
        self.t = 10 ** (lo + (hi - lo) * epoch / max(epochs, 1))
        self.k = max(1 / self.t, 1.0)

    def pseudo_grad(self, x: Tensor) -> Tensor:
        return (self.k * self.t) * (1 - torch.tanh(self.t * x).square())

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}, t={self.t:.4g}, k={self.k:.4g}"


class StochasticSign(nn.Module):
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


class ZeroOneSign(nn.Module):
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


class ThresholdSign(nn.Module):
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


STES: dict[str, type[SignSTE]] = {
    cls.name: cls for cls in (IdentitySTE, ClippedSTE, ApproxSignSTE, SwishSignSTE, EDESTE)
}


def build_ste(name: str, **options) -> SignSTE:
    """Instantiate the STE registered under `name` with its options (e.g. beta for swish_sign)."""
    try:
        return STES[name](**options)
    except KeyError:
        raise ConfigError(f"ste={name}: unknown estimator; choose one of: {', '.join(STES)}") from None
