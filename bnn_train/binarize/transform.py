"""binarize_(model, scheme): turn a full-precision model into a binary one in place; clip_latent_, set_epoch_."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from bnn_train.binarize.product import BF16_EXACT_TERMS
from bnn_train.binarize.layers import BINARY_LAYERS, BinaryConv2d, BinaryLinear
from bnn_train.binarize.quantizers import EpochScheduled, ste_from_config
from bnn_train.binarize.schemes import Scheme, get_scheme

log = logging.getLogger(__name__)

LayerFilter = Callable[[str, nn.Module], bool]


def binarize_(model: nn.Module, scheme: Scheme | str, ste: Mapping | str | None = None,
              filter_fn: LayerFilter | None = None, *, real_weights: bool = False,
              input_act: str | None = None, **scheme_keys) -> list[str]:
    """Swap the model's Conv2d/Linear layers for binary ones sharing the same latent weights, as
    `scheme` says, in place (torchao's quantize_(model, config, filter_fn) in spirit). scheme: a
    `Scheme`, or a registered name with `scheme_keys` changing its defaults
    (binarize_(net, "xnor", act_scale="none") is binarize_(net, get_scheme("xnor", act_scale="none"))).

    ste: the activation estimator, a name or an `ste` config node ({"name": "swish_sign", "beta": 5});
    None: the scheme's default. filter_fn(name, layer) -> False keeps a layer real, on top of the
    scheme's first/last/downsample policy: the first and last Conv2d/Linear in module registration
    order (models register layers in forward order), and layers under a module named `downsample`.
    The network input is never binarized: the first layer, when binarized, gets binary weights only.
    Pretraining stages keep the layer policy but not all of the binarization: real_weights=True
    leaves weights real, input_act="relu"|"clip" puts ReLU or clip(x, -1, 1) where the scheme's sign
    would be (Bi-Real Net sec. 3.3). Returns the names of the layers that were swapped.
    """
    if isinstance(scheme, str):
        scheme = get_scheme(scheme, **scheme_keys)
    elif scheme_keys:
        raise TypeError(f"binarize_: keys {sorted(scheme_keys)} apply to a scheme name, not to a Scheme object")
    ste_node = {"name": ste} if isinstance(ste, str) else dict(ste or {"name": scheme.default_ste})
    layers = [(n, m) for n, m in model.named_modules() if type(m) in BINARY_LAYERS]
    if not layers:
        return []
    first, last = layers[0][0], layers[-1][0]
    done = []
    for name, layer in layers:
        if (scheme.keep_first_real and name == first) or (scheme.keep_last_real and name == last):
            continue
        if scheme.keep_downsample_real and "downsample" in name.split("."):
            continue
        if filter_fn is not None and not filter_fn(name, layer):
            continue
        weight_q = None if real_weights else scheme.weight_binarizer(layer.weight, ste_node)
        input_q = None if name == first else scheme.input_quantizer(_in_channels(layer), ste_from_config(ste_node))
        if input_q is not None and input_act is not None:
            input_q = INPUT_ACTS[input_act]()
        if weight_q is None and input_q is None:
            continue  # nothing binary about this layer (full precision, or a pretraining stage's first layer)
        scale = scheme.activation_scale(layer) if input_q is not None else None
        binary = BINARY_LAYERS[type(layer)].from_float(layer, weight_q, input_q, scale)
        if not real_weights:
            binary.affine = scheme.output_affine(binary.weight.shape[0])
        model.set_submodule(name, binary)
        done.append(name)
    if done:
        log.info("%s: %d of %d layers swapped%s", scheme.name, len(done), len(layers),
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
