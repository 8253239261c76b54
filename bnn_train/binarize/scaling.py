"""Weight binarizers: sign(W) and alpha * sign(W) with alpha = mean|W| per output channel."""

from __future__ import annotations

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


WEIGHT_BINARIZERS: dict[str, type[nn.Module]] = {"sign": SignWeight, "scaled_sign": ScaledSignWeight}
