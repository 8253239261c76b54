"""The C++ XNOR/popcount kernels (binary_ops.cpp), compiled on first use with torch's extension
builder (a C++ compiler and ninja, both installed with the package's requirements on Linux).

`load()` returns the compiled module, or None with one logged line saying why and that the
packed engine falls back to torch's fp32 convolution of the +-1 signs (exact for the integer sums
below 2^24 that binary layers produce, and much slower). `conv` is the checked entry point.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("binary_ops.cpp")
IMPLS = {"scalar": 0, "avx2": 1, "avx512": 2}
ACTS = {"none": 0, "clamp": 1, "shifted_prelu": 2}
_module = None
_failed: str | None = None


def load():
    """The compiled kernels (cached per process and on disk under torch's extension dir)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    try:
        from torch.utils.cpp_extension import load as build

        # -ffp-contract=off: the epilogue must round every multiply and add as torch does (no FMA)
        _module = build(name="bnn_binary_ops", sources=[str(SOURCE)],
                        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                        verbose=os.environ.get("BNN_VERBOSE_BUILD") == "1")
    except Exception as e:  # a missing compiler or ninja: say so once, keep working on the torch path
        _failed = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("packed kernels unavailable (%s); using torch's fp32 convolution of the signs instead "
                    "(exact, much slower)", _failed)
    return _module


def best_impl() -> str:
    module = load()
    if module is None:
        return "torch"
    return {v: k for k, v in IMPLS.items()}[module.best_impl()]


class ConvOut(NamedTuple):
    """What `conv` returns; None where not asked for."""

    real: Tensor | None      # float [B, O, Ho, Wo], NCHW or channels_last memory
    bits: Tensor | None      # int64 [B, Ho, Wo, ceil(O / 64)]
    raw: Tensor | None       # int32 [B, Ho, Wo, O], the sums P
    abs_mean: Tensor | None  # float [B, 1, Ho, Wo], mean over channels of |v|


_lanes: int | None = None


def aten_lanes() -> int:
    """Floats per vector of the kernel torch sums a contiguous float dimension with, found by
    comparing the kernels' emulation of that order with torch.sum (0: none matches here, and the
    epilogue does not compute mean_c |v|). Not the CPU's capability: this torch runs its sum with
    8-float vectors on an AVX-512 CPU."""
    global _lanes
    if _lanes is None:
        module, _lanes = load(), 0
        g = torch.Generator().manual_seed(0)
        probes = [torch.randn(64, n, generator=g) * 3 for n in (5, 8, 24, 64, 130, 512, 1043)]
        for lanes in (16, 8, 4, 1):
            if module is not None and all(torch.equal(module.inner_sum_abs(p, lanes), p.abs().sum(dim=1))
                                          for p in probes):
                _lanes = lanes
                break
    return _lanes


def _pair(name: str, value) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"binary_conv: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def resolve_impl(impl: str | int | None) -> int:
    """The kernels' number for `impl` (a name, a number, or None for the best this CPU runs)."""
    module = load()
    if module is None:
        raise RuntimeError(f"binary_conv: the C++ kernels are unavailable ({_failed})")
    best = module.best_impl()
    if impl is None:
        return best
    number = IMPLS.get(impl) if isinstance(impl, str) else impl
    if number not in IMPLS.values():
        raise ValueError(f"binary_conv: impl={impl!r} is not one of {', '.join(IMPLS)}")
    if number > best:
        name = {v: k for k, v in IMPLS.items()}
        raise ValueError(f"binary_conv: impl={name[number]} is not supported by this CPU (best: {name[best]})")
    return number


def conv(x_bits: Tensor, w_bits: Tensor, channels: int, kernel, stride=1, padding=0, dilation=1,
         impl: str | int | None = None, *, scale: Tensor | None = None, pixel_scale: Tensor | None = None,
         bias: Tensor | None = None, bn: tuple[Tensor, Tensor] | None = None, residual: Tensor | None = None,
         act: str = "none", act_params: Tensor | None = None, real: str | None = None,
         threshold: Tensor | None = None, bits: bool = False, fold: Tensor | None = None,
         abs_mean: bool = False) -> ConvOut:
    """XNOR/popcount convolution of packed operands, checked; returns ConvOut(real, bits, raw, abs_mean).

    x_bits int64 [B, H, W, ceil(channels / 64)] (`pack_channels`), w_bits int64 [kh * kw * words, O]
    (`packed.kernel_weight`). Without an epilogue, raw = the int32 [B, Ho, Wo, O] sums P. Epilogue,
    in this order and torch's fp32 roundings: v = P * scale_o * pixel_scale + bias_o, then
    fma(v, bn[0]_o, bn[1]_o), + residual, act; real = v as NCHW ("nchw") or channels_last ("nhwc")
    memory; bits = v >= threshold_o (0 without one). fold = int32 [2, O] (s; tau): bits = s_o * P >= tau_o.
    abs_mean: mean_o |v_o| per pixel, summed in the order torch sums a channels_last tensor's channels
    (XNOR-Net's K(x) = box(mean_c |x|) then needs no pass over x).
    """
    module = load()
    number = resolve_impl(impl)
    kh, kw = _pair("kernel", kernel)
    sh, sw = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    dh, dw = _pair("dilation", dilation)
    if sh < 1 or sw < 1:
        raise ValueError(f"binary_conv: stride must be >= 1, got {(sh, sw)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"binary_conv: dilation must be >= 1, got {(dh, dw)}")
    if ph < 0 or pw < 0:
        raise ValueError(f"binary_conv: padding must be >= 0, got {(ph, pw)}")
    if x_bits.dim() != 4 or x_bits.dtype != torch.int64:
        raise ValueError(f"binary_conv: x_bits must be int64 [B, H, W, words], got {x_bits.dtype} "
                         f"{list(x_bits.shape)}")
    words = (channels + 63) // 64
    if channels < 1 or x_bits.shape[3] != words:
        raise ValueError(f"binary_conv: channels={channels} need {words} words per pixel, but x_bits has "
                         f"{x_bits.shape[3]}")
    if w_bits.dim() != 2 or w_bits.shape[0] != kh * kw * words:
        raise ValueError(f"binary_conv: w_bits must be [{kh * kw * words}, O] for a {kh}x{kw} kernel over "
                         f"{channels} channels, got {list(w_bits.shape)}")
    if act not in ACTS:
        raise ValueError(f"binary_conv: act={act!r} is not one of {', '.join(ACTS)}")
    if real not in (None, "nchw", "nhwc"):
        raise ValueError(f"binary_conv: real={real!r} is not one of None, 'nchw', 'nhwc'")
    if abs_mean and not aten_lanes():
        raise ValueError("binary_conv: abs_mean: torch's channel sum order is not one the kernels reproduce here")
    bn_mul, bn_add = bn if bn is not None else (None, None)
    out = module.binary_conv_fused(x_bits.contiguous(), w_bits.contiguous(), channels, kh, kw, sh, sw, ph, pw, dh, dw,
                                   number, scale, pixel_scale, bias, bn_mul, bn_add, residual, ACTS[act], act_params,
                                   {None: -1, "nchw": 0, "nhwc": 1}[real], threshold, bits, fold,
                                   aten_lanes() if abs_mean else 0)
    return ConvOut(*out)
