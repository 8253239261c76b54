"""IR-Net in one file: its estimator (EDE), its weight binarizer (Libra-PB) and the scheme.

Qin, Gong, Liu, Shen, Wei, Yu & Song 2020, "Forward and Backward Information Retention for Accurate
Binary Neural Networks" (IR-Net), CVPR; the authors' code is htqin/IR-Net. Registered here and
selected with configs/method/irnet.yaml and configs/ste/ede.yaml: nothing else names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bnn_train.binarize.quantizers import STES, EpochScheduled, SignSTE, sign_int8
from bnn_train.binarize.scaling import SplitWeightBinarizer, l1_mean, through_ste
from bnn_train.binarize.schemes import SCHEMES, Scheme
from bnn_train.errors import require


@dataclass
class EDEConfig:
    name: str = "ede"
    t_min: float = 1e-3
    t_max: float = 10.0

    def __post_init__(self):
        for key in ("t_min", "t_max"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        require(self.t_min <= self.t_max, "t_min", self.t_min, f"must be <= t_max ({self.t_max})")


@STES.register("ede", EDEConfig)
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

    def __init__(self, t_min: float = EDEConfig.t_min, t_max: float = EDEConfig.t_max):
        super().__init__()
        EDEConfig(t_min=t_min, t_max=t_max)  # checks the range
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



def standardize(w: Tensor) -> Tensor:
    """(W_o - mean(W_o)) / std(W_o) for each output channel o (std with n - 1, as torch.std)."""
    flat = w.flatten(1)
    centered = flat - flat.mean(1, keepdim=True)
    return (centered / centered.std(1, keepdim=True)).view_as(w)


def power_of_two_scale(w_hat: Tensor) -> Tensor:
    """2^round(log2(mean|W_hat_o|)) per output channel, shape [O]."""
    return torch.exp2(torch.round(torch.log2(l1_mean(w_hat, True))))


class LibraSignWeight(SplitWeightBinarizer):
    """IR-Net's Libra-PB weights: per output channel o,
        W_hat = (W - mean(W_o)) / std(W_o),   W_b = 2^round(log2 mean|W_hat_o|) * sign(W_hat),
    the scale detached (a power of two: a bit shift at inference). The standardized weights are
    balanced (half of them +1, maximal information entropy) and of unit spread, so latent weights
    need no clip: sign(W_hat) does not change when W is scaled. Gradient: the STE at W_hat, then
    the standardization's chain rule over each channel of n weights (sigma its std, h = alpha * G *
    ste'(W_hat), G = dL/dW_b):
        dL/dW_i = (h_i - mean(h) - W_hat_i * sum_j h_j W_hat_j / (n - 1)) / sigma.

    Qin et al. 2020, "Forward and Backward Information Retention for Accurate Binary Neural
    Networks" (IR-Net), sec. 3.1, eq. 6-9 and the authors' code.
    """

    def __init__(self, ste: SignSTE):
        super().__init__()
        self.ste = ste

    def forward(self, w: Tensor) -> Tensor:
        w_hat = standardize(w)
        alpha = power_of_two_scale(w_hat.detach()).view(-1, *([1] * (w.dim() - 1)))
        return alpha * self.ste(w_hat)

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        w_hat = standardize(w.detach())
        return sign_int8(w_hat), power_of_two_scale(w_hat)

    def latent_grad(self, w: Tensor, grad_wb: Tensor, s: Tensor, alpha: Tensor | None, row_sums=None) -> Tensor:
        flat = w.detach().flatten(1)
        centered = flat - flat.mean(1, keepdim=True)
        sigma = centered.std(1, keepdim=True)
        w_hat = centered / sigma
        h = through_ste(self.ste, w_hat.view_as(w), grad_wb.mul_(alpha.view(-1, *([1] * (w.dim() - 1)))))
        h = h.flatten(1)
        n = flat.shape[1]
        proj = (h * w_hat).sum(1, keepdim=True) / (n - 1)
        return ((h - h.mean(1, keepdim=True) - w_hat * proj) / sigma).view_as(w)



@SCHEMES.register("irnet")
@dataclass
class IRNet(Scheme):
    """No latent clip by default: sign(W_hat) and the Libra-PB scale do not change when W is scaled,
    so latent weights need no bound; weight decay on them (optim.decay_binary=true, the authors'
    setting) keeps their scale, and with it the step size, from drifting."""

    name: str = "irnet"
    keep_first_real: bool = True
    keep_last_real: bool = True
    clip_latent: Optional[float] = None

    summary = ("Libra-PB weights 2^round(log2 mean|W_hat|) * sign(W_hat), W_hat standardized per output channel; "
               "activations sign(x); EDE estimator for both, scheduled per epoch")
    paper = "Qin et al. 2020, IR-Net"
    binary_activations = True
    default_ste = "ede"
    weight_ste = "ede"
    act = "hardtanh"

    def weight_binarizer(self, weight, ste_node):
        return LibraSignWeight(self._weight_estimator(ste_node))
