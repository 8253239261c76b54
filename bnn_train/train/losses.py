"""Training losses (`loss=cross_entropy|squared_hinge`) and the quantization-error terms of `method.reg`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize import binary_layers


def squared_hinge(logits: Tensor, y: Tensor) -> Tensor:
    """mean over samples and classes of max(0, 1 - t_c * o_c)^2 with t = +1 for the label, -1 else.

    The loss BinaryNet trains its MNIST MLP with (Hubara, Courbariaux et al. 2016, sec. 2.6; the
    Theano code's `T.mean(T.sqr(T.maximum(0., 1. - target * output)))`)."""
    t = torch.full_like(logits, -1.0).scatter_(1, y[:, None], 1.0)
    return (1 - t * logits).clamp_min(0).square().mean()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


LOSSES = {"cross_entropy": cross_entropy, "squared_hinge": squared_hinge}


def quantization_errors(model: nn.Module) -> dict[str, Tensor]:
    """Per binarized layer l, eps_l = sum_i |W_i - Q(W)_i| / n: the mean distance of the latent
    weights from the binary weights the forward uses (Q includes alpha)."""
    with torch.no_grad():
        return {name: (layer.weight - layer.quantized_weight()).abs().mean() for name, layer in binary_layers(model)}


def quantization_penalty(model: nn.Module, kind: str) -> Tensor:
    """sum_l mean|W - Q(W)| (l1) or sum_l mean (W - Q(W))^2 (l2), Q(W) held constant, so the
    gradient pulls each latent weight towards its binary value (cf. the quantization-error
    regularizers of Ding et al. 2019, "Regularizing Activation Distribution", and Darabi et al.
    2018, "BNN+", which regularize towards +-alpha)."""
    terms = []
    for _, layer in binary_layers(model):
        diff = layer.weight - layer.quantized_weight().detach()
        terms.append(diff.abs().mean() if kind == "l1" else diff.square().mean())
    return torch.stack(terms).sum() if terms else torch.zeros(())
