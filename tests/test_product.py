"""Exact low-precision products of +-1 operands: bit-identical forwards, gradients, memory saved."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_train.binarize import STES, SplitWeightBinarizer, binarize_, build_ste, sign
from bnn_train.binarize.layers import BINARY_LAYERS
from bnn_train.binarize.product import FusedBinaryConv2d, FusedBinaryLinear, chunk_channels
from bnn_train.binarize.quantizers import ClippedSTE, IdentitySTE, sign_int8
from bnn_train.binarize.scaling import MagnitudeSignWeight, ScaledSignWeight, SignWeight
from bnn_train.binarize.transform import binary_layers, set_binary_precision

PRECISIONS = ["fp32", "bf16", "int8"]


def pm1(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)


def test_a_plain_bf16_product_is_not_exact_for_large_sums():
    """The hazard the module guards against: a bf16 output rounds integer sums above 256."""
    x, w = pm1(64, 3000), pm1(50, 3000, seed=1)
    x[:, :1500] = w[0, :1500]  # push output column 0 far above 256
    ref = x @ w.t()
    assert ref.abs().max() > 1000
    assert not torch.equal((x.bfloat16() @ w.bfloat16().t()).float(), ref)


SIGN = SignWeight(IdentitySTE())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_linear_product_is_bit_identical_to_fp32(precision):
    x, w = torch.randn(64, 3000), torch.randn(50, 3000, generator=torch.Generator().manual_seed(1))
    x[:, :1500] = w[0, :1500]  # output column 0 far above 256
    ref = F.linear(sign(x), sign(w))
    assert ref.abs().max() > 1000
    out = FusedBinaryLinear.apply(x, w, None, SIGN, precision, "fp32")
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_linear_product_with_channel_scales_rounds_once(precision):
    """alpha * (integer sum) is the exact value rounded once: at least as close as the fp32 path."""
    x, w = torch.randn(8, 1000), torch.randn(20, 1000)
    wq = ScaledSignWeight(ClippedSTE())(w)
    exact = sign(x).double() @ wq.double().t()
    out = FusedBinaryLinear.apply(x, w, None, ScaledSignWeight(ClippedSTE()), precision, "fp32")
    assert (out.double() - exact).abs().max() <= (F.linear(sign(x), wq).double() - exact).abs().max() + 1e-12
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=0)


def test_sign_int8_maps_zero_to_plus_one():
    assert sign_int8(torch.tensor([-2.0, -0.0, 0.0, 3.0])).tolist() == [-1, 1, 1, 1]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_product_is_bit_identical_to_fp32(precision, channels_last, stride, padding, dilation):
    x, w = torch.randn(3, 64, 9, 9), torch.randn(24, 64, 3, 3)  # 576 terms per output
    w[0], x[0] = 1.0, 1.0  # filter 0 on sample 0 sums to +576 at interior positions, far above 256
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=padding, dilation=dilation)
    assert ref.abs().max() > 256
    conv = ((stride, stride), (padding, padding), (dilation, dilation))
    out = FusedBinaryConv2d.apply(x, w, None, SIGN, conv, precision, "fp32")
    assert torch.equal(out, ref)


def test_bf16_conv_chunks_hold_at_most_256_terms():
    assert chunk_channels(16, 9) == 16
    assert chunk_channels(64, 9) == 16
    assert chunk_channels(512, 9) == 16
    assert chunk_channels(256, 1) == 256
    assert chunk_channels(600, 1) == 200
    assert chunk_channels(7, 9) == 7
    assert chunk_channels(1, 300) == 1


BINARIZERS = {"sign": lambda: SignWeight(IdentitySTE()), "sign_clipped": lambda: SignWeight(ClippedSTE()),
              "scaled": lambda: ScaledSignWeight(ClippedSTE()), "magnitude": lambda: MagnitudeSignWeight(ClippedSTE())}


@pytest.mark.parametrize("binarizer", BINARIZERS)
@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_gradients_equal_the_unfused_layer(binarizer, ste, kind):
    """With fp32 gradients the fused function is the unfused chain: sign/STE, binarizer, product
    (whose gradients test_binarize checks against their formulas)."""
    torch.manual_seed(0)
    quantize_input, make_w = build_ste(ste), BINARIZERS[binarizer]
    if kind == "linear":
        x, w = torch.randn(16, 300) * 1.5, torch.rand(40, 300) * 2 - 1
        ref_fn = lambda x, w: F.linear(quantize_input(x), make_w()(w))  # noqa: E731
        fused = lambda x, w: FusedBinaryLinear.apply(x, w, quantize_input.mask_bound, make_w(), "int8", "fp32")  # noqa: E731
    else:
        x, w = torch.randn(2, 8, 6, 6) * 1.5, torch.rand(5, 8, 3, 3) * 2 - 1
        ref_fn = lambda x, w: F.conv2d(quantize_input(x), make_w()(w), stride=2, padding=1)  # noqa: E731
        fused = lambda x, w: FusedBinaryConv2d.apply(  # noqa: E731
            x, w, quantize_input.mask_bound, make_w(), ((2, 2), (1, 1), (1, 1)), "fp32", "fp32")
    g = torch.randn_like(ref_fn(x, w))
    grads = []
    for fn in (ref_fn, fused):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xr, wr)
        out.backward(g)
        grads.append((out.detach(), xr.grad, wr.grad))
    (ref_out, ref_gx, ref_gw), (out, gx, gw) = grads
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, ref_gx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gw, ref_gw, rtol=1e-5, atol=1e-5)


def test_bf16_backward_is_close_to_fp32():
    x, w = torch.randn(32, 512), torch.randn(64, 512)
    g = torch.randn(32, 64)
    grads = []
    for backward in ("fp32", "bf16"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        FusedBinaryLinear.apply(xr, wr, 1.0, SIGN, "int8", backward).backward(g)
        grads.append((xr.grad, wr.grad))
    (ref_x, ref_w), (got_x, got_w) = grads
    assert not torch.equal(got_x, ref_x)  # a different computation...
    for got, ref in ((got_x, ref_x), (got_w, ref_w)):  # ...within bf16's rounding of g (2^-8 relative)
        assert (got - ref).norm() / ref.norm() < 1e-2


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 300), nn.BatchNorm1d(300), nn.Hardtanh(),
                         nn.Linear(300, 10))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_binarized_network_forward_is_unchanged_by_the_precision(precision):
    x = torch.randn(4, 3, 8, 8)
    ref_net, net = _net(), _net()
    binarize_(ref_net, "bnn", keep_last_real=False)
    binarize_(net, "bnn", keep_last_real=False)
    chosen = set_binary_precision(net, precision, "bf16", torch.device("cpu"))
    assert set(chosen) == {"3", "7", "10"}  # every layer with +-1 inputs; the first sees real pixels
    ref, out = ref_net(x), net(x)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (_, a), (_, b) in zip(binary_layers(net), binary_layers(ref_net)):
        assert (a.weight.grad - b.weight.grad).norm() <= 2e-2 * b.weight.grad.norm()


@pytest.mark.parametrize("scheme", ["xnor", "bireal", "reactnet"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_scaled_schemes_layers_match_the_float_path(scheme, precision):
    """Layer by layer on the same input (a whole network would amplify last-bit differences
    wherever a pre-activation sits at sign's discontinuity)."""
    ref_net, net = _net(), _net()
    binarize_(ref_net, scheme, keep_last_real=False)
    binarize_(net, scheme, keep_last_real=False)
    set_binary_precision(net, precision, "fp32", torch.device("cpu"))
    inputs = {"3": torch.randn(4, 32, 8, 8), "7": torch.randn(4, 2048), "10": torch.randn(4, 300)}
    for (name, a), (_, b) in zip(binary_layers(net), binary_layers(ref_net)):
        if name in inputs:
            out, ref = a(inputs[name]), b(inputs[name])
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), name


def test_real_input_layers_keep_the_float_path():
    net = _net()
    binarize_(net, "bwn")  # real activations: no exact +-1 x +-1 product
    assert set_binary_precision(net, "int8", "bf16", torch.device("cpu")) == {}


def test_auto_picks_int8_for_linear_and_fp32_for_conv_on_cpu():
    net = _net()
    binarize_(net, "bnn", keep_last_real=False)
    chosen = set_binary_precision(net, "auto", "bf16", torch.device("cpu"))
    assert chosen == {"3": "fp32", "7": "int8", "10": "int8"}


def _saved_bytes(fn) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_product_saves_one_byte_signs_instead_of_fp32_inputs():
    """Per sample, a binarized linear layer saves for backward: float path, a bool STE mask and
    sign(x) in fp32 (5 bytes per input); product path, the mask and int8 signs (2 bytes)."""
    ref_net = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    net = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    for n in (ref_net, net):
        binarize_(n, "bnn", keep_first_real=False, keep_last_real=False)
    set_binary_precision(net, "int8", "bf16", torch.device("cpu"))

    def per_sample(layer):  # the difference of two batch sizes removes what the weights save
        small, large = (_saved_bytes(lambda: layer(torch.randn(b, 1024, requires_grad=True))) for b in (64, 128))
        return (large - small) / 64

    assert per_sample(ref_net[1]) == 5 * 1024
    assert per_sample(net[1]) == 2 * 1024


# ---- every weight binarizer x every estimator, from the registries: fused == float ---------------

def _split_binarizers(cls=SplitWeightBinarizer):
    for sub in cls.__subclasses__():
        if not inspect.isabstract(sub) and sub.__module__.startswith("bnn_train.binarize"):
            yield sub
        yield from _split_binarizers(sub)


PAIRS = [(b, s) for b in sorted(set(_split_binarizers()), key=lambda c: c.__name__) for s in sorted(STES)]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("binarizer,ste", PAIRS, ids=[f"{b.__name__}-{s}" for b, s in PAIRS])
def test_fused_product_gradients_equal_the_float_chain(binarizer, ste, kind):
    """The fused exact product (int8 forward, fp32 backward) against the plain float layer, for every
    registered estimator on the inputs and every split weight binarizer with its own estimator."""
    torch.manual_seed(0)
    if kind == "linear":
        float_layer = nn.Linear(48, 6, bias=False)
        x = torch.randn(5, 48) * 1.5
    else:
        float_layer = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        x = torch.randn(2, 8, 5, 5) * 1.5
    outs = []
    for precision in ("fp32", "int8"):
        layer = BINARY_LAYERS[type(float_layer)].from_float(
            float_layer, binarizer(build_ste(ste)), build_ste(ste), None)
        layer.set_precision(precision, "fp32")
        assert layer._use_product() is (precision == "int8")
        xr = x.clone().requires_grad_()
        float_layer.weight.grad = None
        out = layer(xr)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append((out.detach(), xr.grad, float_layer.weight.grad.clone()))
    (ref, ref_gx, ref_gw), (got, gx, gw) = outs
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, ref_gx, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gw, ref_gw, rtol=1e-4, atol=1e-5)
