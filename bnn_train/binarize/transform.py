"""binarize_(model, ...): turn a full-precision model into a binary one in place; clip_latent_."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from bnn_train.binarize.layers import BINARY_LAYERS, BinaryConv2d, BinaryLinear
from bnn_train.binarize.quantizers import ThresholdSign, build_ste
from bnn_train.binarize.scaling import WEIGHT_BINARIZERS, activation_scale_for
from bnn_train.binarize.schemes import get_scheme
from bnn_train.errors import ConfigError

log = logging.getLogger(__name__)


def binarize_(
    model: nn.Module,
    scheme: str,
    ste: str = "clipped",
    keep_first_real: bool = True,
    keep_last_real: bool = True,
    keep_downsample_real: bool = False,
    ste_options: dict | None = None,
    act_scale: str = "none",
    stochastic: bool = False,
    real_weights: bool = False,
    input_act: str | None = None,
    magnitude_aware: bool = True,
) -> list[str]:
    """Swap the model's Conv2d/Linear layers for binary ones sharing the same latent weights.

    First and last layer are the first and last Conv2d/Linear in module registration order (models
    register layers in forward order); downsample layers are those under a module named
    `downsample`. The network input is never binarized: the first layer, when binarized, gets
    binary weights only (BinaryNet keeps its first layer's input real).
    act_scale="k_map" multiplies by XNOR-Net's activation scale K (schemes with binary activations);
    stochastic=True samples weights as in stochastic BinaryConnect (schemes with sign weights).
    magnitude_aware=False replaces Bi-Real's magnitude-aware sign by plain sign(W) (its ablation).
    Pretraining stages keep the scheme's layer policy but not all of its binarization:
    real_weights=True leaves weights real, input_act="relu"|"clip" puts ReLU or clip(x, -1, 1) where
    the scheme's sign would be (Bi-Real Net sec. 3.3).
    Returns the names of the layers that were swapped.
    """
    spec = get_scheme(scheme)
    if act_scale not in ("none", "k_map"):
        raise ConfigError(f"method.act_scale={act_scale}: choose one of: none, k_map")
    if act_scale == "k_map" and not spec.binary_activations:
        raise ConfigError(f"method.act_scale=k_map: {scheme} keeps activations real; K applies to binary activations")
    if stochastic and spec.weight != "sign":
        raise ConfigError(f"method.stochastic=true: only for schemes with sign(W) weights, not {scheme}")
    weight_kind = None if real_weights else "stochastic_sign" if stochastic else spec.weight
    if weight_kind == "magnitude_sign" and not magnitude_aware:
        weight_kind = "sign"  # Bi-Real's ablation: plain sign(W), no magnitude in forward or gradient
    if not spec.binarizes:
        return []
    layers = [(n, m) for n, m in model.named_modules() if type(m) in BINARY_LAYERS]
    if not layers:
        return []
    first, last = layers[0][0], layers[-1][0]
    done = []
    for name, layer in layers:
        if (keep_first_real and name == first) or (keep_last_real and name == last):
            continue
        if keep_downsample_real and "downsample" in name.split("."):
            continue
        weight_q = WEIGHT_BINARIZERS[weight_kind](build_ste(spec.weight_ste)) if weight_kind else None
        binary_input = spec.binary_activations and name != first
        input_q = build_ste(ste, **(ste_options or {})) if binary_input else None
        if binary_input and spec.learnable_threshold:
            input_q = ThresholdSign(_in_channels(layer), input_q)
        if binary_input and input_act is not None:
            input_q = INPUT_ACTS[input_act]()
        scale = activation_scale_for(layer) if binary_input and act_scale == "k_map" else None
        model.set_submodule(name, BINARY_LAYERS[type(layer)].from_float(layer, weight_q, input_q, scale))
        done.append(name)
    log.info("%s: %d of %d layers swapped%s", scheme, len(done), len(layers),
             " (pretraining stage: real weights)" if real_weights else "")
    return done


INPUT_ACTS = {"relu": nn.ReLU, "clip": nn.Hardtanh}


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def binary_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every layer whose weights are binarized."""
    for name, m in model.named_modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.weight_quantizer is not None:
            yield name, m


@torch.no_grad()
def clip_latent_(model: nn.Module, bound: float | None) -> None:
    """Clamp every latent weight of a binarized layer to [-bound, bound] (None: do nothing).

    Courbariaux et al. 2015, BinaryConnect sec. 2.4: without it latent weights grow without
    bound and stop flipping sign.
    """
    if bound is None:
        return
    for _, layer in binary_layers(model):
        layer.weight.clamp_(-bound, bound)
