"""Binarization schemes: what each method does to weights and activations, looked up by name."""

from __future__ import annotations

from dataclasses import dataclass

from bnn_train.errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    """One binarization method.

    weight: None (real) or a key of `scaling.WEIGHT_BINARIZERS`.
    weight_ste: the estimator of the weight path (the `ste` group only sets the activation path).
    binary_activations: sign() on the input of every binarized layer but the network's first.
    learnable_threshold: the activation sign is ReActNet's RSign, sign(x - beta_c).
    act: activation the model uses under `model.act=auto` (None: the model's own default).
    needs_per_conv_shortcut: only for architectures with a real shortcut around every conv.
    """

    name: str
    weight: str | None
    weight_ste: str
    binary_activations: bool
    summary: str
    paper: str
    learnable_threshold: bool = False
    act: str | None = None
    needs_per_conv_shortcut: bool = False

    @property
    def binarizes(self) -> bool:
        return self.weight is not None or self.binary_activations


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp", None, "identity", False, "no binarization (full-precision baseline)", "-"),
        Scheme("binaryconnect", "sign", "identity", False, "weights sign(W), activations real",
               "Courbariaux, Bengio & David 2015, BinaryConnect"),
        Scheme("bwn", "scaled_sign", "clipped", False,
               "weights alpha*sign(W), alpha = mean|W| per output channel; activations real",
               "Rastegari et al. 2016, XNOR-Net (BWN)"),
        Scheme("bnn", "sign", "identity", True, "weights sign(W), activations sign(x), no scaling",
               "Hubara, Courbariaux et al. 2016, Binarized Neural Networks"),
        Scheme("xnor", "scaled_sign", "clipped", True,
               "weights alpha*sign(W) per output channel, activations sign(x)",
               "Rastegari et al. 2016, XNOR-Net"),
        Scheme("bireal", "magnitude_sign", "clipped", True,
               "magnitude-aware weights (||W||_1/n)*sign(W) with the paper's scaled gradient; "
               "activations sign(x), ApproxSign estimator by default",
               "Liu et al. 2018, Bi-Real Net"),
        Scheme("reactnet", "magnitude_sign", "clipped", True,
               "Bi-Real weights; activations RSign sign(x - beta_c) and RPReLU after each block",
               "Liu et al. 2020, ReActNet", learnable_threshold=True, act="rprelu",
               needs_per_conv_shortcut=True),
        Scheme("irnet", "libra_sign", "ede", True,
               "Libra-PB weights 2^round(log2 mean|W_hat|) * sign(W_hat), W_hat standardized per output "
               "channel; activations sign(x); EDE estimator for both, scheduled per epoch",
               "Qin et al. 2020, IR-Net", act="hardtanh"),
    )
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ConfigError(f"method={name}: unknown scheme; choose one of: {', '.join(SCHEMES)}") from None
