"""Weight binarizers (sign(W), alpha*sign(W), stochastic sign) and XNOR-Net's activation scale K."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize.quantizers import SignSTE


def mean_abs_scale(w: Tensor) -> Tensor:
    """alpha_o = ||W_o||_1 / n: the mean absolute latent weight of each output channel o.

    Rastegari et al. 2016, "XNOR-Net", eq. 3-4: the alpha minimizing ||W - alpha*sign(W)||^2.
    Shape [out, 1, ...] so that it broadcasts over W.
    """
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


class SignWeight(nn.Module):
    """W_b = sign(W), gradient to the latent W through `ste` (BinaryConnect, BinaryNet)."""

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        return self.ste(w)


class ScaledSignWeight(nn.Module):
    """W_b = alpha * sign(W), alpha = mean|W| per output channel (BWN and XNOR-Net).

    alpha is not detached: the gradient is the full chain rule over a channel of n weights,
        dL/dW_i = alpha * g_i * ste'(W_i) + sign(W_i)/n * sum_j g_j * sign(W_j),
    with g = dL/dW_b. (The XNOR-Net paper writes the diagonal approximation g_i * (1/n + alpha *
    ste'(W_i)), which drops the j != i terms of the second part.)
    """

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        return mean_abs_scale(w) * self.ste(w)


class MagnitudeSignWeight(nn.Module):
    """Bi-Real Net's magnitude-aware sign: W_b = (||W||_1 / n) * sign(W) per output channel, with
    the paper's gradient
        dL/dW_i = dL/dW_b,i * (||W||_1 / n) * ste'(W_i),
    i.e. the gradient reaching the latent weights is scaled by the channel's magnitude, and the
    derivative of the magnitude itself is dropped (alpha is a constant in backward).

    Liu et al. 2018, "Bi-Real Net", sec. 3.2 (magnitude-aware gradient). (Contrast `ScaledSignWeight`, which keeps
    d alpha/dW; and implementations that detach alpha from the forward product, which lose the
    scale in the gradient.)
    """

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        return mean_abs_scale(w).detach() * self.ste(w)


class StochasticSignWeight(nn.Module):
    """Stochastic BinaryConnect: W_b = +1 with probability clip((W + 1) / 2, 0, 1), else -1, while
    training; deterministic sign(W) in eval mode.

    Courbariaux, Bengio & David 2015, "BinaryConnect", eq. 2. Sampled as sign(W - u), u ~ U(-1, 1):
    P(W - u >= 0) = clip((W + 1) / 2, 0, 1). The gradient reaches W through `ste` at W - u.
    """

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        if not self.training:
            return self.ste(w)
        return self.ste(w - (torch.rand_like(w) * 2 - 1))


WEIGHT_BINARIZERS: dict[str, type[nn.Module]] = {
    "sign": SignWeight, "scaled_sign": ScaledSignWeight, "magnitude_sign": MagnitudeSignWeight,
    "stochastic_sign": StochasticSignWeight}


class ConvActivationScale(nn.Module):
    """XNOR-Net's K for a conv: A = (1/c) sum_c |I_c|, K = A * k with k a kh x kw box filter of
    value 1/(kh kw), applied with the conv's own stride, padding and dilation.

    Rastegari et al. 2016, "XNOR-Net", sec. 3.2 (fig. 2): the output is (sign(I) * sign(W)) . K alpha.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        kh, kw = conv.kernel_size
        self.register_buffer("box", torch.full((1, 1, kh, kw), 1.0 / (kh * kw)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        a = x.abs().mean(dim=1, keepdim=True)
        return F.conv2d(a, self.box.to(a.dtype), stride=self.stride, padding=self.padding, dilation=self.dilation)


class LinearActivationScale(nn.Module):
    """XNOR-Net's K for a linear layer: the per-sample mean |I| over the input features."""

    def forward(self, x: Tensor) -> Tensor:
        return x.abs().mean(dim=-1, keepdim=True)


def activation_scale_for(layer: nn.Module) -> nn.Module:
    return ConvActivationScale(layer) if isinstance(layer, nn.Conv2d) else LinearActivationScale()
