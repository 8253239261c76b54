"""The XNOR/popcount kernels' argument checks and fused epilogue: every step rounds as the torch
modules it replaces, so the epilogue's fp32 output equals theirs bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_train.binarize import sign
from bnn_train.deploy import kernels
from bnn_train.deploy.packed import kernel_weight, pack_words
from bnn_train.models.activations import RPReLU

ops = kernels.load()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
IMPLS = [name for name in ("scalar", "avx2", "avx512") if ops is not None and kernels.IMPLS[name] <= ops.best_impl()]


def operands(c=64, o=32, size=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(2, c, size, size, generator=g), torch.randn(o, c, k, k, generator=g)
    return x, w, ops.pack_channels(x, 0), kernel_weight(w >= 0)


# ---- argument checks: one-line errors naming the argument, never a crash or garbage ----------------


def test_cpp_entry_rejects_an_unknown_impl():
    _, _, xb, wb = operands()
    with pytest.raises(RuntimeError, match="impl=7"):
        ops.binary_conv(xb, wb, 64, 3, 3, 1, 1, 1, 1, 1, 1, 7)
    with pytest.raises(RuntimeError, match="impl=-1"):
        ops.pack_channels(torch.randn(1, 3, 2, 2), -1)


@pytest.mark.skipif(ops is None or ops.best_impl() == 2, reason="this CPU runs every implementation")
def test_cpp_entry_rejects_an_impl_the_cpu_lacks():
    _, _, xb, wb = operands()
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        ops.binary_conv(xb, wb, 64, 3, 3, 1, 1, 1, 1, 1, 1, ops.best_impl() + 1)


def test_python_entry_rejects_an_impl_the_cpu_lacks(monkeypatch):
    class AVX2Only:  # the compiled module as a CPU without AVX-512 would see it
        def __getattr__(self, name):
            return getattr(ops, name)

        def best_impl(self):
            return kernels.IMPLS["avx2"]

    _, _, xb, wb = operands()
    monkeypatch.setattr(kernels, "load", lambda: AVX2Only())
    with pytest.raises(ValueError, match="impl=avx512 is not supported by this CPU"):
        kernels.conv(xb, wb, 64, 3, 1, 1, impl="avx512")
    with pytest.raises(ValueError, match="impl='avx1024'"):
        kernels.conv(xb, wb, 64, 3, 1, 1, impl="avx1024")


def test_stride_zero_is_an_error():
    _, _, xb, wb = operands()
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ops.binary_conv(xb, wb, 64, 3, 3, 0, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        kernels.conv(xb, wb, 64, 3, stride=(1, 0), padding=1)
    with pytest.raises(RuntimeError, match="dilation must be >= 1"):
        ops.binary_conv(xb, wb, 64, 3, 3, 1, 1, 1, 1, 0, 1, 0)


def test_channels_that_do_not_match_the_packed_words_are_an_error():
    _, _, xb, wb = operands(c=64)  # one word per pixel
    with pytest.raises(RuntimeError, match="channels C=100 need 2 words per pixel, but x_bits has 1"):
        ops.binary_conv(xb, wb, 100, 3, 3, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="channels=100 need 2 words"):
        kernels.conv(xb, wb, 100, 3, 1, 1)
    with pytest.raises(RuntimeError, match="w_bits has 9 rows"):  # right words, weights for another C
        ops.binary_conv(operands(c=100)[2], wb, 100, 3, 3, 1, 1, 1, 1, 1, 1, 0)


def test_a_kernel_larger_than_the_padded_input_is_an_error():
    _, _, xb, wb = operands(size=2)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.binary_conv(xb, wb, 64, 3, 3, 1, 1, 0, 0, 1, 1, 0)


# ---- results ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c,o,size,stride,padding,dilation", [
    (64, 64, 13, 1, 1, 1), (64, 32, 12, 2, 1, 1), (128, 96, 9, 1, 2, 2), (70, 64, 11, 1, 0, 1), (64, 40, 10, 1, 1, 1)])
def test_packed_conv_is_integer_exact_on_larger_images(impl, c, o, size, stride, padding, dilation):
    # wide enough for the AVX-512 path that sums 4 interior pixels at once, and its edges
    x, w, _, wb = operands(c, o, size)
    xb = ops.pack_channels(x, kernels.IMPLS[impl])
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=padding, dilation=dilation)
    raw = kernels.conv(xb, wb, c, 3, stride, padding, dilation, impl).raw
    assert torch.equal(raw.permute(0, 3, 1, 2).float(), ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_channels_reads_nchw_and_channels_last_alike(impl):
    x = torch.randn(3, 70, 5, 4)
    x[0, 3, 1, 1] = -0.0
    expected = pack_words(x.permute(0, 2, 3, 1) >= 0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert torch.equal(ops.pack_channels(x.contiguous(memory_format=fmt), kernels.IMPLS[impl]), expected)
    assert torch.equal(ops.pack_channels(x.transpose(2, 3).transpose(2, 3)[:, :, :, :], kernels.IMPLS[impl]), expected)
    big = torch.randn(3, 70, 40, 30)  # NCHW planes split across threads mid-image
    assert torch.equal(ops.pack_channels(big, kernels.IMPLS[impl]), pack_words(big.permute(0, 2, 3, 1) >= 0))


def torch_tail(raw, alpha, k, bias, bn, residual, act):
    """What the training-time modules compute from the int32 sums, step by step."""
    v = raw.permute(0, 3, 1, 2).float() * alpha.view(1, -1, 1, 1)
    v = v * k
    v = v + bias.view(1, -1, 1, 1)
    v = bn(v)
    v = v + residual
    return act(v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("o", [64, 40])  # 40: a tail of channels below one AVX-512 register
@pytest.mark.parametrize("real", ["nchw", "nhwc"])
@pytest.mark.parametrize("act_name", ["hardtanh", "rprelu", "identity"])
def test_epilogue_rounds_like_the_torch_modules(impl, o, real, act_name):
    torch.manual_seed(0)
    x, w, _, wb = operands(64, o, 9)
    xb = ops.pack_channels(x, kernels.IMPLS[impl])
    alpha, bias, t = torch.rand(o) + 0.5, torch.randn(o), torch.randn(o) * 0.5
    k = torch.rand(2, 1, 9, 9) + 0.1
    bn = nn.BatchNorm2d(o).eval()
    bn.running_mean.normal_(0, 3), bn.running_var.uniform_(0.5, 4), bn.weight.data.normal_(), bn.bias.data.normal_()
    residual = torch.randn(2, o, 9, 9).contiguous(memory_format=torch.channels_last)
    act = {"hardtanh": nn.Hardtanh(), "identity": nn.Identity(), "rprelu": RPReLU(o)}[act_name]
    if act_name == "rprelu":
        for p in act.parameters():
            p.data.normal_()
    with torch.no_grad():
        ref = torch_tail(kernels.conv(xb, wb, 64, 3, 1, 1, 1, impl).raw, alpha, k, bias, bn, residual, act)
        zeros = torch.zeros(1, o, 1, 1)
        bn_mul = F.batch_norm(zeros + 1, torch.zeros(o), bn.running_var, bn.weight, torch.zeros(o), False, 0.0, bn.eps)
        spec = {"hardtanh": ("clamp", torch.tensor([-1.0, 1.0])), "identity": ("none", None)}.get(act_name) or \
            ("shifted_prelu", torch.stack([act.gamma, act.beta, act.zeta]).contiguous())
        y, bits, raw, mean = kernels.conv(xb, wb, 64, 3, 1, 1, 1, impl, scale=alpha, pixel_scale=k.flatten(),
                                          bias=bias, bn=(bn_mul.flatten(), bn(zeros).flatten()), residual=residual,
                                          act=spec[0], act_params=spec[1], real=real, threshold=t, bits=True,
                                          abs_mean=True)
    assert raw is None
    # mean_c |v| as torch takes it from a channels_last tensor (XNOR-Net's K of the next layer)
    assert torch.equal(mean, ref.contiguous(memory_format=torch.channels_last).abs().mean(dim=1, keepdim=True))
    assert y.is_contiguous(memory_format=torch.channels_last if real == "nhwc" else torch.contiguous_format)
    assert torch.equal(y, ref)
    assert torch.equal(bits, pack_words((ref - t.view(1, -1, 1, 1) >= 0).permute(0, 2, 3, 1)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("o", [64, 40])
def test_folded_thresholds_give_bits_from_the_integer_sums(impl, o):
    x, w, _, wb = operands(64, o, 7)
    xb = ops.pack_channels(x, kernels.IMPLS[impl])
    raw = kernels.conv(xb, wb, 64, 3, 1, 1, 1, impl).raw
    g = torch.Generator().manual_seed(3)
    s = torch.where(torch.rand(o, generator=g) < 0.5, 1, -1).int()
    tau = torch.randint(-20, 20, (o,), generator=g).int()
    tau[:2] = torch.tensor([-(2**31), 2**31 - 1])  # always +1, never +1
    bits = kernels.conv(xb, wb, 64, 3, 1, 1, 1, impl, fold=torch.stack([s, tau]).contiguous(), bits=True).bits
    assert torch.equal(bits, pack_words(s * raw >= tau))


@pytest.mark.parametrize("o", [8, 24, 64, 1043])  # below one vector, a partial vector, 4 vectors, 16 rows of 4 and a tail
def test_abs_mean_sums_channels_in_torchs_order(o):
    x, w, _, wb = operands(64, o, 5)
    xb = ops.pack_channels(x, 0)
    alpha = torch.rand(o) * 3
    y, _, _, mean = kernels.conv(xb, wb, 64, 3, 1, 1, 1, scale=alpha, real="nhwc", abs_mean=True)
    assert torch.equal(mean, y.abs().mean(dim=1, keepdim=True))
