"""Packed 1-bit models: export a trained network with its binary weights as bits, load it back as a
module whose binarized layers run on the XNOR/popcount kernels.

File (torch.save of a dict, format "bnn-packed-1"): the run's config, "input_shape" = [channels,
image_size, num_classes] of the network's input and output, every real tensor of the state dict in
fp32 (first/last layers, BatchNorm, scales, thresholds), and per binarized layer sign(W) as bits
(numpy.packbits of [O, C * kh * kw], 1 <=> +1) with its shape.
A binarized layer's output is alpha * (sign(x) . sign(W)) [* K(x)] [affine] + b exactly as in
training, with the +-1 sum computed by the kernels as an int32 and the float tail applied in the
kernel's epilogue with torch's fp32 roundings, so predictions match the training-time module
(`trainer.binary_precision` exact paths) bit for bit. `load_packed` then folds BatchNorm, shortcut
additions, activations and the next layer's sign into those epilogues (`fused.py`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize import binary_layers
from bnn_train.binarize.layers import BinaryConv2d, BinaryLinear
from bnn_train.binarize.product import memory_format
from bnn_train.binarize.quantizers import SignSTE, StochasticSign, ThresholdSign
from bnn_train.deploy import kernels
from bnn_train.errors import CheckpointError

log = logging.getLogger(__name__)
FORMAT = "bnn-packed-1"


# ---- bits --------------------------------------------------------------------------------------


def pack_rows(signs: Tensor) -> np.ndarray:
    """bool [O, K] -> uint8 [O, ceil(K / 8)] (numpy.packbits, big-endian bit order)."""
    return np.packbits(signs.cpu().numpy(), axis=1)


def unpack_rows(bits: np.ndarray, k: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits, axis=1, count=k).astype(bool))


def pack_words(signs: Tensor) -> Tensor:
    """bool [..., C] -> int64 [..., ceil(C / 64)], bit c of word c // 64 at position c % 64."""
    c = signs.shape[-1]
    words = (c + 63) // 64
    padded = F.pad(signs.to(torch.int64), (0, words * 64 - c)).view(*signs.shape[:-1], words, 64)
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64, dtype=torch.int64)  # bit 63 wraps to int64 min
    return (padded * weights).sum(-1)


def kernel_weight(signs: Tensor) -> Tensor:
    """bool [O, C, kh, kw] -> int64 [kh * kw * words, O], the kernels' layout (filters contiguous)."""
    o, c, kh, kw = signs.shape
    words = pack_words(signs.permute(2, 3, 0, 1))  # [kh, kw, O, words]
    return words.permute(0, 1, 3, 2).reshape(kh * kw * words.shape[-1], o).contiguous()


# ---- packed layers -------------------------------------------------------------------------------


def sign_threshold(quantizer: nn.Module) -> Tensor | None:
    """t of the input quantizer's sign(x - t) in eval mode (None: t = 0)."""
    if isinstance(quantizer, ThresholdSign):
        return quantizer.threshold.detach().float()
    if isinstance(quantizer, (SignSTE, StochasticSign)):
        return None
    raise CheckpointError(f"export: input quantizer {type(quantizer).__name__} has no packed form "
                          f"(the packed engine runs +-1 activations)")


def _sign_source(quantizer: nn.Module, x: Tensor) -> Tensor:
    """The tensor whose sign the layer's input quantizer takes (eval mode)."""
    t = sign_threshold(quantizer)
    return x if t is None else x - t.view(1, -1, *([1] * (x.dim() - 2)))


class PackedActivation:
    """An activation handed from one packed layer to the next: the signs the next layer's quantizer
    takes, as kernel bits [B, H, W, ceil(C / 64)], the real values where something else needs them,
    and mean_c |x| [B, 1, H, W] where the next layer's XNOR-Net K needs only that."""

    __slots__ = ("bits", "channels", "real", "abs_mean")

    def __init__(self, bits: Tensor, channels: int, real: Tensor | None = None, abs_mean: Tensor | None = None):
        self.bits, self.channels, self.real, self.abs_mean = bits, channels, real, abs_mean


class PackedBinaryConv2d(nn.Module):
    """A BinaryConv2d with sign(W) as kernel bits; forward = alpha * popcount conv [* K] [affine] + b."""

    def __init__(self, layer: BinaryConv2d, signs: Tensor, alpha: Tensor | None):
        super().__init__()
        conv = isinstance(layer, nn.Conv2d)  # a linear layer is the 1x1 case
        self.kernel_size, self.stride = (layer.kernel_size, layer.stride) if conv else ((1, 1), (1, 1))
        self.padding, self.dilation = (layer.padding, layer.dilation) if conv else ((0, 0), (1, 1))
        self.in_channels, self.out_channels = signs.shape[1], signs.shape[0]
        self.input_quantizer, self.act_scale, self.affine = layer.input_quantizer, layer.act_scale, layer.affine
        self.bias = layer.bias
        self.register_buffer("alpha", alpha)
        self.register_buffer("bits", kernel_weight(signs))
        self.register_buffer("signs", torch.where(signs, 1, -1).to(torch.int8))  # for the torch fallback

    out_shape = (1, -1, 1, 1)  # how per-channel alpha, affine and bias broadcast over the output

    def forward(self, x: Tensor | PackedActivation) -> Tensor:
        """alpha * (sign(x) . sign(W)) [* K(x)] [affine] + b, as `_BinaryMixin.scaled` in training;
        the output keeps the input's memory format, so that later layers sum in the same order."""
        real = x.real if isinstance(x, PackedActivation) else x
        fmt = memory_format(real) if real is not None else torch.contiguous_format
        return self.product(x, "nhwc" if fmt == torch.channels_last else "nchw")[0]

    # The kernels see every layer as a conv over [B, C, H, W]; a linear layer overrides these two.
    def as_image(self, x: Tensor) -> Tensor:
        return x

    def from_image(self, y: Tensor) -> Tensor:
        return y

    def input_bits(self, x: Tensor | PackedActivation, impl: int) -> Tensor:
        """The kernel bits of sign(x - t): handed over by the previous layer, or packed here."""
        if isinstance(x, PackedActivation):
            return x.bits
        return kernels.load().pack_channels(self.as_image(_sign_source(self.input_quantizer, x)).float(), impl)

    def pixel_scale(self, x: Tensor | PackedActivation) -> Tensor | None:
        """XNOR-Net's K(x) per output pixel, flattened (None without an activation scale)."""
        if self.act_scale is None:
            return None
        if isinstance(x, PackedActivation) and x.abs_mean is not None:
            return self.k_from_mean(x.abs_mean).reshape(-1).contiguous()
        real = x.real if isinstance(x, PackedActivation) else x
        if real is None:
            raise RuntimeError("packed layer with an activation scale K got no real input")
        return self.act_scale(real).float().reshape(-1).contiguous()

    def k_from_mean(self, a: Tensor) -> Tensor:
        """K from A = mean_c |x| [B, 1, H, W]: A * k, k a kh x kw box filter of 1 / (kh kw) applied with
        the conv's stride, padding and dilation (XNOR-Net sec. 3.2); `fused` checks it against the
        layer's own act_scale before relying on it."""
        kh, kw = self.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=a.dtype)
        return F.conv2d(a, box, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def product(self, x: Tensor | PackedActivation, real: str | None, **epilogue) -> tuple:
        """(real, bits, abs_mean) of the kernel with the layer's own tail, alpha * P [* K] + b, in its
        epilogue, followed by `epilogue` (kernels.conv's bn, residual, act, threshold, bits, fold,
        abs_mean); the affine output, which the kernel does not replicate, runs in torch on the int32
        sums instead."""
        module = kernels.load()
        if module is None or self.affine is not None:
            if epilogue:
                raise RuntimeError("a packed layer with an affine output or without kernels has no fused epilogue")
            out = self._torch_tail(self._sign_product(x), x, real)
            return out, None, None
        impl = kernels.resolve_impl(None)
        k = self.pixel_scale(x) if epilogue.get("fold") is None else None  # folded thresholds need no K
        scale = None if self.alpha is None else self.alpha.expand(self.out_channels).contiguous()
        out = kernels.conv(self.input_bits(x, impl), self.bits, self.in_channels, self.kernel_size, self.stride,
                           self.padding, self.dilation, impl, scale=scale, pixel_scale=k,
                           bias=None if self.bias is None else self.bias.detach().float(), real=real, **epilogue)
        return (None if out.real is None else self.from_image(out.real)), out.bits, out.abs_mean

    def _sign_product(self, x: Tensor | PackedActivation) -> Tensor:
        """conv(sign(x - t), sign(W)) as float: the kernels' int32 sums, or torch when they could not be built."""
        module = kernels.load()
        if module is None:
            pre = self.as_image(_sign_source(self.input_quantizer, x))
            return self.from_image(F.conv2d(torch.where(pre >= 0, 1.0, -1.0), self.signs.float(), stride=self.stride,
                                            padding=self.padding, dilation=self.dilation))
        impl = kernels.resolve_impl(None)
        raw = kernels.conv(self.input_bits(x, impl), self.bits, self.in_channels, self.kernel_size, self.stride,
                           self.padding, self.dilation, impl).raw
        return self.from_image(raw.permute(0, 3, 1, 2).float())

    def _torch_tail(self, out: Tensor, x: Tensor | PackedActivation, real: str | None) -> Tensor:
        if real is not None and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last if real == "nhwc" else torch.contiguous_format)
        if self.alpha is not None:
            out = out * self.alpha.view(self.out_shape)
        if self.act_scale is not None:
            out = out * self.act_scale(x.real if isinstance(x, PackedActivation) else x)
        if self.affine is not None:
            out = self.affine(out, self.out_shape)
        return out if self.bias is None else out + self.bias.view(self.out_shape)


class PackedBinaryLinear(PackedBinaryConv2d):
    """A BinaryLinear as the 1x1 conv of a 1x1 image."""

    out_shape = (-1,)

    def k_from_mean(self, a: Tensor) -> Tensor:
        return a.reshape(-1, 1)  # XNOR-Net's K of a linear layer is the mean |x| itself

    def as_image(self, x: Tensor) -> Tensor:
        return x[:, :, None, None]

    def from_image(self, y: Tensor) -> Tensor:
        return y.flatten(1)


class FixedBinaryWeight(nn.Module):
    """The binary weights of a loaded packed model: alpha * s from the file, whatever the latent."""

    def __init__(self, signs: Tensor, alpha: Tensor | None):
        super().__init__()
        self.register_buffer("s", torch.where(signs, 1.0, -1.0))
        self.register_buffer("alpha", alpha)

    def forward(self, w: Tensor) -> Tensor:
        return self.s if self.alpha is None else self.alpha.view(-1, *([1] * (self.s.dim() - 1))) * self.s

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.s.to(torch.int8), self.alpha


def binary_alpha(name: str, layer: nn.Module) -> Tensor | None:
    """alpha of a binarized layer's W_b = alpha * sign(W) ([O] or [1]), None for plain sign(W)."""
    quantizer = layer.weight_quantizer
    if hasattr(quantizer, "split"):
        alpha = quantizer.split(layer.weight.detach())[1]
    elif hasattr(quantizer, "scale"):  # learned alpha
        alpha = quantizer.scale.detach().flatten()
    else:
        raise CheckpointError(f"export: layer {name} ({type(quantizer).__name__}) has no binary weights at "
                              f"evaluation (stochastic BinaryConnect evaluates with real-valued weights)")
    return None if alpha is None else alpha.float().clone()


def binary_signs(layer: nn.Module) -> Tensor:
    """sign(W_b) > 0 of a binarized layer as bools: from the binarizer's own map where it has one
    (IR-Net's Libra-PB signs the standardized weights), else W >= 0."""
    quantizer = layer.weight_quantizer
    if hasattr(quantizer, "split"):
        return quantizer.split(layer.weight.detach())[0] > 0
    return layer.weight.detach() >= 0


def to_packed_(model: nn.Module, names: set[str] | None = None) -> list[str]:
    """Swap every binarized layer whose inputs are signed (`names`, default: those whose
    `binary_product` holds now) for its packed form, in place; layers with real inputs (a BNN's
    first layer, BWN) keep the float product of their binary weights."""
    done = []
    for name, layer in list(binary_layers(model)):
        if not (layer.binary_product if names is None else name in names):
            continue
        signs = binary_signs(layer)
        if isinstance(layer, BinaryLinear):
            signs = signs[:, :, None, None]
        cls = PackedBinaryConv2d if isinstance(layer, BinaryConv2d) else PackedBinaryLinear
        model.set_submodule(name, cls(layer, signs, layer.weight_quantizer.split(layer.weight.detach())[1]))
        done.append(name)
    return done


# ---- export / load --------------------------------------------------------------------------------


def export(model: nn.Module, config: dict, input_shape: tuple[int, int, int], path: Path) -> dict:
    """Write `model` (a trained, binarized network) as a packed file; returns sizes in bytes.

    input_shape: (channels, image_size, num_classes), the arguments `build_network` rebuilds the
    network from (stored under the key "input_shape")."""
    binary = {}
    for name, layer in binary_layers(model):
        w = layer.weight.detach()
        binary[name] = {"bits": torch.from_numpy(pack_rows(binary_signs(layer).flatten(1))), "shape": list(w.shape),
                        "alpha": binary_alpha(name, layer)}
    real = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not (k.endswith(".weight") and k[: -len(".weight")] in binary)}
    payload = {"format": FORMAT, "config": config, "input_shape": list(input_shape), "real": real, "binary": binary}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return {"packed_bytes": len(buffer.getvalue()),
            "binary_bits_bytes": sum(b["bits"].numel() for b in binary.values()),
            "fp32_model_bytes": sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())}


def load_packed(path: Path, fuse: bool = True) -> nn.Module:
    """A module for inference from a packed file: the network rebuilt from its config, real
    tensors loaded, binary layers running on the packed kernels (eval mode). fuse: hand packed bits
    from layer to layer and fold what follows each binary layer into its epilogue (`fused.py`);
    False: each binary layer on its own, with a float tensor between layers."""
    from omegaconf import OmegaConf

    from bnn_train.deploy import fused
    from bnn_train.train.setup import build_network

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable packed model ({type(e).__name__}); export one with "
                              f"scripts/export.py") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file; export one with scripts/export.py")
    cfg = OmegaConf.create(payload["config"])
    c, size, classes = payload["input_shape"]  # [channels, image_size, num_classes]
    model, _ = build_network(cfg, c, classes, size)
    signs = {name: unpack_rows(e["bits"].numpy(), int(np.prod(e["shape"][1:]))).view(e["shape"])
             for name, e in payload["binary"].items()}
    state = {**payload["real"], **{f"{n}.weight": torch.where(s, 1.0, -1.0) for n, s in signs.items()}}
    model.load_state_dict(state, strict=True)
    model.eval()
    # Decided before the weights are swapped: whether the training-time forward runs the exact
    # +-1 product, and (fused) the memory formats that forward gives every tensor.
    packable = {n for n, layer in binary_layers(model) if layer.binary_product}
    formats = fused.reference_formats(model, (c, size, size)) if fuse and kernels.load() is not None else None
    for name, layer in binary_layers(model):
        layer.weight_quantizer = FixedBinaryWeight(signs[name], payload["binary"][name]["alpha"])
    to_packed_(model, packable)
    model.eval()
    if formats is None:
        return model
    return fused.PackedNetwork(model, formats)
