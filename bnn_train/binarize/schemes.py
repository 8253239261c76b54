"""Binarization schemes: what each method does to weights and activations, looked up by name."""

from __future__ import annotations

from dataclasses import dataclass

from bnn_train.errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    """One binarization method.

    weight: None (real), "sign" or "scaled_sign" (see `scaling.WEIGHT_BINARIZERS`).
    weight_ste: the estimator of the weight path (the `ste` group only sets the activation path).
    binary_activations: sign() on the input of every binarized layer but the network's first.
    """

    name: str
    weight: str | None
    weight_ste: str
    binary_activations: bool
    summary: str
    paper: str

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
    )
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ConfigError(f"method={name}: unknown scheme; choose one of: {', '.join(SCHEMES)}") from None
