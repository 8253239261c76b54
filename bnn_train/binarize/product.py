"""Fused binarized products: sign, straight-through estimator and the +-1 x +-1 product of a
binary conv or linear layer in one autograd function, computed exactly in low precision.

Forward: x_b = sign(x), s = sign(W), y = alpha_o * sum_k x_b,k s_ok (alpha from the weight
binarizer: 1 for sign(W), mean|W_o| for BWN/XNOR/Bi-Real). The sum is an integer of at most K terms
(K = in_features, or C_in * kh * kw), and +-1 is exact in int8, bf16 and fp32, so each precision
gives the integer exactly and then one fp32 multiply by alpha. For sign(W) the output is
bit-identical to the fp32 product; for scaled weights it is the exact value rounded once.

Exactness bounds of the accumulators:
  int8: torch._int_mm accumulates in int32, exact for K < 2^31.
  bf16: products accumulate in fp32, but a bf16 *output* holds integers exactly only up to 256,
        so the reduction is cut into chunks of at most 256 terms (exact in bf16), summed in fp32.
  fp32: exact for K <= 2^24.

Backward, with g = dL/dy and G = dL/dW_b:
  dL/dx = (g * alpha) . s * 1{|x| <= bound}   (clipped STE; no mask for the identity STE)
  G     = g^T . x_b, and dL/dW = binarizer.latent_grad(W, G) (its STE and the scale's chain rule)
backward="bf16" computes both products with g rounded to bf16 (relative error <= 2^-8, fp32
accumulation), as mixed-precision training does for every layer; "fp32" keeps g exact.

Saved for backward: x_b as int8 and the STE mask as bool (1 byte each per input element, against
the fp32 x and fp32 sign(x) of the unfused layers), s as int8, and alpha; W itself is a Parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnn_train.binarize.quantizers import sign_int8

BF16_EXACT_TERMS = 256  # integers above 256 are rounded in bf16 (8 significant bits)


def _dtype(backward: str) -> torch.dtype:
    return torch.bfloat16 if backward == "bf16" else torch.float32


def _input_mask(x: Tensor, bound: float | None) -> Tensor | None:
    return None if bound is None else x.abs() <= bound


# ---- linear ----------------------------------------------------------------------------------


def _sign_matmul(xb: Tensor, s: Tensor, precision: str) -> Tensor:
    """xb [M, K] times s [N, K]^T, both int8 +-1 -> [M, N] fp32 holding the exact integer sums."""
    if precision == "int8":
        return torch._int_mm(xb, s.t()).float()
    if precision == "bf16":
        x16, s16 = xb.to(torch.bfloat16), s.to(torch.bfloat16)
        out = None
        for k in range(0, xb.shape[1], BF16_EXACT_TERMS):
            part = (x16[:, k:k + BF16_EXACT_TERMS] @ s16[:, k:k + BF16_EXACT_TERMS].t()).float()
            out = part if out is None else out.add_(part)
        return out
    return xb.float() @ s.float().t()


class FusedBinaryLinear(torch.autograd.Function):
    """y = alpha * (sign(x) . sign(W)^T) with the input STE `bound` and the weight `binarizer`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bound, binarizer, precision: str, backward: str) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xb, mask = sign_int8(x2), _input_mask(x2, bound)
        s, alpha = binarizer.split(w)
        with torch.autocast(x.device.type, enabled=False):  # the precision is ours to choose
            out = _sign_matmul(xb, s, precision)
        # P = x_b . s^T, for binarizers whose gradient needs sum_j G_oj s_oj = sum_b g_bo P_bo
        product = out.clone() if binarizer.needs_row_sums else None
        if alpha is not None:
            out.mul_(alpha)
        ctx.save_for_backward(xb, mask, s, w, alpha, product)
        ctx.binarizer, ctx.backward_precision, ctx.in_shape = binarizer, backward, x.shape
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):
        xb, mask, s, w, alpha, product = ctx.saved_tensors
        dt = _dtype(ctx.backward_precision)
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gs = g2 if alpha is None else g2 * alpha
            grad_x = (gs.to(dt) @ s.to(dt)).float()
            if mask is not None:
                grad_x.mul_(mask)
            grad_x = grad_x.view(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            row_sums = None if product is None else (g2 * product).sum(0)
            grad_w = ctx.binarizer.latent_grad(w, (g2.to(dt).t() @ xb.to(dt)).float(), s, alpha, row_sums)
        return grad_x, grad_w, None, None, None, None


# ---- conv --------------------------------------------------------------------------------------


def _im2col(x: Tensor, kernel, stride, padding, dilation):
    """[B, C, H, W] -> [B * Ho * Wo, C * kh * kw] from a strided view of the padded input (any dtype)."""
    kh, kw = kernel
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    b, c, h, w = x.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sb, sc, sh, sw = x.stride()
    cols = x.as_strided((b, ho, wo, c, kh, kw),
                        (sb, sh * stride[0], sw * stride[1], sc, sh * dilation[0], sw * dilation[1]))
    return cols.reshape(b * ho * wo, c * kh * kw), (b, ho, wo)


def chunk_channels(c_in: int, taps: int) -> int:
    """The largest divisor of c_in whose chunk sums at most 256 terms per output (at least 1 channel)."""
    return max(d for d in range(1, c_in + 1) if c_in % d == 0 and (d * taps <= BF16_EXACT_TERMS or d == 1))


def memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _sign_conv(xb: Tensor, s: Tensor, stride, padding, dilation, precision: str) -> Tensor:
    """conv2d of int8 +-1 xb [B, C, H, W] with int8 +-1 s [O, C, kh, kw] -> fp32 exact integer sums."""
    if precision == "int8":
        cols, (b, ho, wo) = _im2col(xb, s.shape[2:], stride, padding, dilation)
        out = torch._int_mm(cols, s.flatten(1).t()).float()
        return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)  # a channels_last view, no copy
    fmt = memory_format(xb)
    if precision == "bf16":
        o, c, kh, kw = s.shape
        chunk = chunk_channels(c, kh * kw)
        groups = c // chunk
        # One grouped conv: group j sees the input channels of chunk j and every filter restricted
        # to them, so each bf16 output sums at most 256 terms (exact); fp32 adds the chunks.
        wg = s.view(o, groups, chunk, kh, kw).transpose(0, 1).reshape(groups * o, chunk, kh, kw)
        out = F.conv2d(xb.to(torch.bfloat16), wg.to(torch.bfloat16).contiguous(memory_format=fmt),
                       stride=stride, padding=padding, dilation=dilation, groups=groups)
        return out.float() if groups == 1 else out.unflatten(1, (groups, o)).sum(1, dtype=torch.float32)
    return F.conv2d(xb.float(), s.float().contiguous(memory_format=fmt), stride=stride, padding=padding,
                    dilation=dilation)


class FusedBinaryConv2d(torch.autograd.Function):
    """y = alpha * conv(sign(x), sign(W)) (groups = 1, zero padding)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bound, binarizer, conv, precision: str, backward: str) -> Tensor:
        stride, padding, dilation = conv
        xb, mask = sign_int8(x), _input_mask(x, bound)
        s, alpha = binarizer.split(w)
        with torch.autocast(x.device.type, enabled=False):
            out = _sign_conv(xb, s, stride, padding, dilation, precision)
        # Unlike the linear case, conv weights are small next to activations: the row sums a
        # binarizer needs are cheaper to take from the weight gradient than to keep P for.
        if alpha is not None:
            out = out * alpha.view(1, -1, 1, 1)
        ctx.save_for_backward(xb, mask, s, w, alpha)
        ctx.binarizer, ctx.conv, ctx.backward_precision = binarizer, conv, backward
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        xb, mask, s, w, alpha = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        dt = _dtype(ctx.backward_precision)
        fmt = memory_format(xb)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # One call: dL/dx through W_b = alpha * s (conv weights are small next to activations),
        # dL/dW_b from the int8 signs of x.
        wb = s.to(dt) if alpha is None else (s * alpha.view(-1, 1, 1, 1)).to(dt)
        grad_x, grad_wb, _ = torch.ops.aten.convolution_backward(
            g.to(dt).contiguous(memory_format=fmt), xb.to(dt), wb.contiguous(memory_format=fmt), None,
            list(stride), list(padding), list(dilation), False, [0, 0], 1, [need_x, need_w, False])
        if need_x:
            grad_x = grad_x.float()
            if mask is not None:
                grad_x.mul_(mask)
        grad_w = ctx.binarizer.latent_grad(w, grad_wb.float(), s, alpha) if need_w else None
        return grad_x, grad_w, None, None, None, None, None
