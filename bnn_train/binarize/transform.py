"""binarize_(model, ...): turn a full-precision model into a binary one in place; clip_latent_."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from bnn_train.binarize.product import BF16_EXACT_TERMS
from bnn_train.binarize.layers import BINARY_LAYERS, AffineOutput, BinaryConv2d, BinaryLinear
from bnn_train.binarize.quantizers import EpochScheduled, StochasticSign, ThresholdSign, ZeroOneSign, build_ste
from bnn_train.binarize.scaling import WEIGHT_BINARIZERS, LearnableScaleSignWeight, activation_scale_for
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
    weight_scale: str = "auto",
    scale_granularity: str = "channel",
    affine_output: bool = False,
    act_levels: str = "pm1",
    act_stochastic: bool = False,
) -> list[str]:
    """Swap the model's Conv2d/Linear layers for binary ones sharing the same latent weights.

    First and last layer are the first and last Conv2d/Linear in module registration order (models
    register layers in forward order); downsample layers are those under a module named
    `downsample`. The network input is never binarized: the first layer, when binarized, gets
    binary weights only (BinaryNet keeps its first layer's input real).
    act_scale="k_map" multiplies by XNOR-Net's activation scale K (schemes with binary activations);
    stochastic=True samples weights as in stochastic BinaryConnect (schemes with sign weights).
    magnitude_aware=False replaces Bi-Real's magnitude-aware sign by plain sign(W) (its ablation).
    weight_scale: auto (the scheme's own) | none (sign(W)) | mean_abs (alpha = mean|W|; Bi-Real's
    magnitude-aware form for bireal/reactnet) | learnable (a trained alpha initialized to mean|W|),
    per output channel or per layer (scale_granularity). affine_output adds a learnable a * O + c
    per output channel. act_levels="01" encodes binary activations as {0, 1}; act_stochastic
    samples them (BinaryNet's stochastic mode) while training.
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
    if (act_levels != "pm1" or act_stochastic) and not spec.binary_activations:
        raise ConfigError(f"method.act_levels / method.act_stochastic: {scheme} keeps activations real; "
                          f"they apply to schemes with binary activations (bnn, xnor, bireal, reactnet)")
    weight_kind = None if real_weights else _weight_kind(scheme, spec.weight, weight_scale, stochastic, magnitude_aware)
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
        # The weight estimator takes the `ste` group's options when it is the same estimator (IR-Net's
        # EDE schedules weights and activations alike).
        weight_ste_options = (ste_options or {}) if spec.weight_ste == ste else {}
        weight_q = _weight_binarizer(weight_kind, spec.weight_ste, layer.weight, scale_granularity,
                                     weight_ste_options)
        binary_input = spec.binary_activations and name != first
        input_q = build_ste(ste, **(ste_options or {})) if binary_input else None
        if binary_input and act_stochastic:
            input_q = StochasticSign(input_q)
        if binary_input and spec.learnable_threshold:
            input_q = ThresholdSign(_in_channels(layer), input_q)
        if binary_input and act_levels == "01":
            input_q = ZeroOneSign(input_q)
        if binary_input and input_act is not None:
            input_q = INPUT_ACTS[input_act]()
        scale = activation_scale_for(layer) if binary_input and act_scale == "k_map" else None
        binary = BINARY_LAYERS[type(layer)].from_float(layer, weight_q, input_q, scale)
        if affine_output and not real_weights:
            binary.affine = AffineOutput(binary.weight.shape[0])
        model.set_submodule(name, binary)
        done.append(name)
    log.info("%s: %d of %d layers swapped%s", scheme, len(done), len(layers),
             " (pretraining stage: real weights)" if real_weights else "")
    return done


INPUT_ACTS = {"relu": nn.ReLU, "clip": nn.Hardtanh}
WEIGHT_SCALES = ("auto", "none", "mean_abs", "learnable")


def _weight_kind(scheme: str, own: str | None, weight_scale: str, stochastic: bool, magnitude_aware: bool) -> str | None:
    """The key of WEIGHT_BINARIZERS for a scheme whose own weight binarizer is `own`."""
    if weight_scale not in WEIGHT_SCALES:
        raise ConfigError(f"method.weight_scale={weight_scale}: choose one of: {', '.join(WEIGHT_SCALES)}")
    if own is None:
        if weight_scale not in ("auto", "none"):
            raise ConfigError(f"method.weight_scale={weight_scale}: {scheme} keeps weights real; use none")
        return None
    if stochastic:
        if weight_scale not in ("auto", "none"):
            raise ConfigError(f"method.weight_scale={weight_scale}: stochastic BinaryConnect samples unscaled "
                              f"+-1 weights; use none or method.stochastic=false")
        return "stochastic_sign"
    magnitude = own == "magnitude_sign" and magnitude_aware
    if weight_scale == "auto":
        return "sign" if own == "magnitude_sign" and not magnitude_aware else own
    return {"none": "sign", "mean_abs": "magnitude_sign" if magnitude else "scaled_sign",
            "learnable": "learnable_scale"}[weight_scale]


def _weight_binarizer(kind: str | None, weight_ste: str, weight: nn.Parameter, granularity: str,
                      ste_options: dict) -> nn.Module | None:
    if kind is None:
        return None
    if granularity not in ("channel", "layer"):
        raise ConfigError(f"method.weight_scale_granularity={granularity}: choose one of: channel, layer")
    ste, per_channel = build_ste(weight_ste, **ste_options), granularity == "channel"
    if kind == "learnable_scale":
        return LearnableScaleSignWeight(ste, weight, per_channel)
    if kind in ("scaled_sign", "magnitude_sign"):
        return WEIGHT_BINARIZERS[kind](ste, per_channel)
    return WEIGHT_BINARIZERS[kind](ste)


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def binary_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every layer whose weights are binarized."""
    for name, m in model.named_modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.weight_quantizer is not None:
            yield name, m


def set_binary_precision(model: nn.Module, forward: str, backward: str, device: torch.device) -> dict[str, str]:
    """Choose the precision of every exact +-1 x +-1 product (`product.py`); returns {layer: forward}.

    forward="auto" takes the fastest exact one measured on a 2-core AVX-512 CPU: int8
    (torch._int_mm) for linear layers; for convs, bf16 when C_in * kh * kw <= 256 (one exact bf16
    conv), int8 (im2col + _int_mm) from C_in = 512 on, where the im2col copy is small next to
    the product, and oneDNN's fp32 conv in between (a bf16 conv cut into exact chunks was slower).
    On CUDA, _int_mm needs inner and outer sizes that are multiples of 8; other layers take fp32,
    which cuDNN computes exactly in TF32 for +-1 operands (not measured here: no GPU).
    Layers whose inputs or weights are not +-1 keep the float path and are not listed.
    """
    chosen = {}
    for name, layer in binary_layers(model):
        if not layer.binary_product:
            continue
        precision = _auto_precision(layer, device) if forward == "auto" else forward
        layer.set_precision(precision, backward)
        chosen[name] = precision
    return chosen


def _auto_precision(layer: nn.Module, device: torch.device) -> str:
    if isinstance(layer, nn.Conv2d):
        if device.type == "cuda":
            return "fp32"
        terms = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        if terms <= BF16_EXACT_TERMS:
            return "bf16"  # one exact bf16 conv, no chunks
        return "int8" if layer.in_channels >= 512 else "fp32"
    if device.type == "cuda" and (layer.in_features % 8 or layer.out_features % 8):
        return "fp32"
    return "int8"


def set_epoch_(model: nn.Module, epoch: int, epochs: int) -> None:
    """Tell every epoch-scheduled quantizer (e.g. IR-Net's EDE) that epoch `epoch` of `epochs` begins."""
    for m in model.modules():
        if isinstance(m, EpochScheduled):
            m.set_epoch(epoch, epochs)


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
