"""Weight binarizers (sign(W), alpha*sign(W), stochastic sign) and XNOR-Net's activation scale K."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize.quantizers import IndicatorSTE, SignSTE, sign_int8


def through_ste(ste: SignSTE, w: Tensor, grad: Tensor) -> Tensor:
    """grad * ste'(w) in place; indicator estimators (identity, clipped) skip the float pseudo-gradient."""
    if not isinstance(ste, IndicatorSTE):
        return grad.mul_(ste.pseudo_grad(w))
    return grad if ste.mask_bound is None else grad.mul_(w.abs() <= ste.mask_bound)


class WeightBinarizer(nn.Module):
    """Maps a layer's latent weights W to the binary weights W_b its forward uses."""

    def forward(self, w: Tensor) -> Tensor:
        raise NotImplementedError


class SplitWeightBinarizer(WeightBinarizer, abc.ABC):
    """W_b = alpha_o * s with s in {-1, +1}: the fused exact products (`product.py`) take W_b apart
    with `split` and hand dL/dW_b back through `latent_grad`."""

    # latent_grad needs row_sums[o] = sum_j G_oj s_oj, which the fused products compute cheaply
    needs_row_sums: ClassVar[bool] = False

    @abc.abstractmethod
    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """(s as int8 +-1, alpha of shape [O] or [1], or None for alpha = 1)."""

    @abc.abstractmethod
    def latent_grad(self, w: Tensor, grad_wb: Tensor, s: Tensor, alpha: Tensor | None,
                    row_sums: Tensor | None = None) -> Tensor:
        """dL/dW from G = dL/dW_b (which may be overwritten)."""


def mean_abs_scale(w: Tensor, per_channel: bool = True) -> Tensor:
    """alpha_o = ||W_o||_1 / n: the mean absolute latent weight of each output channel o
    (per_channel=False: one alpha = ||W||_1 / N for the whole layer).

    Rastegari et al. 2016, "XNOR-Net", eq. 3-4: the alpha minimizing ||W - alpha*sign(W)||^2.
    Shape [out, 1, ...] (or [1, 1, ...]) so that it broadcasts over W.
    """
    shape = (w.shape[0] if per_channel else 1, *([1] * (w.dim() - 1)))
    return l1_mean(w, per_channel).view(shape)


def l1_mean(w: Tensor, per_channel: bool) -> Tensor:
    """mean_abs_scale flattened to [O] (or [1]), without a |W| temporary."""
    flat = w.flatten(1) if per_channel else w.reshape(1, -1)
    return torch.linalg.vector_norm(flat, 1, dim=1) / flat.shape[1]


def _scale_dims(w: Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1 if per_channel else 0, w.dim()))


class SignWeight(SplitWeightBinarizer):
    """W_b = sign(W), gradient to the latent W through `ste` (BinaryConnect, BinaryNet)."""

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        return self.ste(w)

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return sign_int8(w), None

    def latent_grad(self, w: Tensor, grad_wb: Tensor, s: Tensor, alpha: Tensor | None, row_sums=None) -> Tensor:
        return through_ste(self.ste, w, grad_wb)


class ScaledSignWeight(SplitWeightBinarizer):
    """W_b = alpha * sign(W), alpha = mean|W| per output channel (BWN and XNOR-Net).

    alpha is not detached: the gradient is the full chain rule over a channel of n weights,
        dL/dW_i = alpha * g_i * ste'(W_i) + sign(W_i)/n * sum_j g_j * sign(W_j),
    with g = dL/dW_b. (The XNOR-Net paper writes the diagonal approximation g_i * (1/n + alpha *
    ste'(W_i)), which drops the j != i terms of the second part.)
    """

    def __init__(self, ste: SignSTE, per_channel: bool = True):
        super().__init__()
        self.ste, self.per_channel = ste, per_channel

    def forward(self, w: Tensor) -> Tensor:
        return mean_abs_scale(w, self.per_channel) * self.ste(w)

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return sign_int8(w), l1_mean(w, self.per_channel)

    needs_row_sums = True

    def latent_grad(self, w: Tensor, grad_wb: Tensor, s: Tensor, alpha: Tensor | None,
                    row_sums: Tensor | None = None) -> Tensor:
        """alpha * G * ste'(W) + sign(W) / n * sum_j G_j sign(W_j), over each channel (or the layer).

        row_sums[o] = sum_j G_oj sign(W_oj) if the caller has it (the fused products get it from
        the forward's integer outputs P: sum_j G_oj s_oj = sum_b g_bo P_bo), else computed here."""
        shape = (alpha.numel(), *([1] * (w.dim() - 1)))
        if row_sums is None:
            row_sums = (grad_wb * s).flatten(1).sum(1)
        n = w[0].numel()
        if not self.per_channel:
            row_sums, n = row_sums.sum().view(1), w.numel()
        direct = through_ste(self.ste, w, grad_wb.mul_(alpha.view(shape)))
        return direct.addcmul_(s, (row_sums / n).view(shape))


class MagnitudeSignWeight(SplitWeightBinarizer):
    """Bi-Real Net's magnitude-aware sign: W_b = (||W||_1 / n) * sign(W) per output channel, with
    the paper's gradient
        dL/dW_i = dL/dW_b,i * (||W||_1 / n) * ste'(W_i),
    i.e. the gradient reaching the latent weights is scaled by the channel's magnitude, and the
    derivative of the magnitude itself is dropped (alpha is a constant in backward).

    Liu et al. 2018, "Bi-Real Net", sec. 3.2 (magnitude-aware gradient). (Contrast `ScaledSignWeight`, which keeps
    d alpha/dW; and implementations that detach alpha from the forward product, which lose the
    scale in the gradient.)
    """

    def __init__(self, ste: SignSTE, per_channel: bool = True):
        super().__init__()
        self.ste, self.per_channel = ste, per_channel

    def forward(self, w: Tensor) -> Tensor:
        return mean_abs_scale(w, self.per_channel).detach() * self.ste(w)

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return sign_int8(w), l1_mean(w, self.per_channel)

    def latent_grad(self, w: Tensor, grad_wb: Tensor, s: Tensor, alpha: Tensor | None, row_sums=None) -> Tensor:
        shape = (alpha.numel(), *([1] * (w.dim() - 1)))
        return through_ste(self.ste, w, grad_wb.mul_(alpha.view(shape)))


class LearnableScaleSignWeight(WeightBinarizer):
    """W_b = alpha * sign(W) with alpha a trained parameter per output channel (or one per layer),
    initialized to mean|W| and learned by gradient: dL/dalpha_o = sum_i G_oi sign(W_oi),
    dL/dW_i = alpha * G_i * ste'(W_i) (G = dL/dW_b).

    Bulat & Tzimiropoulos 2019, "XNOR-Net++", sec. 3 (learned scaling factors); also the learned
    alpha of several BWN implementations. The fused products do not cover it (alpha is a Parameter
    of its own), so these layers take the float path.
    """

    def __init__(self, ste: SignSTE, weight: Tensor, per_channel: bool = True):
        super().__init__()
        self.ste, self.per_channel = ste, per_channel
        self.scale = nn.Parameter(mean_abs_scale(weight.detach(), per_channel).clone())

    def forward(self, w: Tensor) -> Tensor:
        return self.scale * self.ste(w)


class StochasticSignWeight(WeightBinarizer):
    """Stochastic BinaryConnect: W_b = +1 with probability clip((W + 1) / 2, 0, 1), else -1, while
    training; in eval mode the real-valued weights clip(W, -1, 1) = E[W_b].

    Courbariaux, Bengio & David 2015, "BinaryConnect", eq. 2. Sampled as sign(W - u), u ~ U(-1, 1):
    P(W - u >= 0) = clip((W + 1) / 2, 0, 1). The gradient reaches W through `ste` at W - u.
    Evaluation follows the paper's sec. 2.6 ("real-valued weights for the stochastic form"): sign(W)
    would be a different network from the sampled ones BatchNorm's running statistics were
    gathered on, while E[W_b] keeps every pre-activation's mean.
    """

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        if not self.training:
            return w.clamp(-1, 1)
        return self.ste(w - (torch.rand_like(w) * 2 - 1))


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
