"""Quantizers, scaling factors and binary layers against their formulas, computed by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_train.binarize import (STES, BinaryConv2d, BinaryLinear, ClippedSTE, IdentitySTE, ScaledSignWeight,
                                SignWeight, binarize_, binary_layers, build_ste, clip_latent_, mean_abs_scale, sign)
from bnn_train.errors import ConfigError

X = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5])


def test_sign_of_zero_is_plus_one():
    assert sign(X).tolist() == [-1, -1, -1, 1, 1, 1, 1]


@pytest.mark.parametrize("ste,expected", [
    (IdentitySTE, [1, 1, 1, 1, 1, 1, 1]),
    (ClippedSTE, [0, 1, 1, 1, 1, 1, 0]),  # 1{|x| <= 1}: the window is closed
])
def test_ste_gradient_matches_formula(ste, expected):
    x = X.clone().requires_grad_()
    g = torch.arange(1.0, 8.0)
    y = ste()(x)
    assert y.tolist() == sign(X).tolist()
    y.backward(g)
    assert torch.equal(x.grad, g * torch.tensor(expected, dtype=torch.float))


def test_every_registered_ste_forward_is_sign():
    for name in STES:
        assert torch.equal(build_ste(name)(X), sign(X))


def test_unknown_ste_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        build_ste("nope")


def test_mean_abs_scale_per_output_channel():
    w = torch.tensor([[[[1.0, -3.0]]], [[[0.5, 0.5]]]])  # [2, 1, 1, 2]
    assert mean_abs_scale(w).flatten().tolist() == [2.0, 0.5]
    assert mean_abs_scale(w).shape == (2, 1, 1, 1)


def test_scaled_sign_weight_gradient_is_full_chain_rule():
    torch.manual_seed(0)
    w = (torch.randn(3, 5) * 0.8).requires_grad_()
    g = torch.randn(3, 5)
    q = ScaledSignWeight(ClippedSTE())
    wb = q(w)
    alpha = w.detach().abs().mean(1, keepdim=True)
    s = sign(w.detach())
    assert torch.allclose(wb, alpha * s)
    wb.backward(g)
    n = w.shape[1]
    expected = alpha * g * (w.detach().abs() <= 1) + s / n * (g * s).sum(1, keepdim=True)
    assert torch.allclose(w.grad, expected, atol=1e-6)


def test_sign_weight_gradient_is_the_ste():
    w = torch.tensor([[-1.5, 0.2], [0.9, 2.0]], requires_grad=True)
    SignWeight(IdentitySTE())(w).backward(torch.ones(2, 2))
    assert torch.equal(w.grad, torch.ones(2, 2))


def test_binary_linear_matches_hand_computation():
    torch.manual_seed(1)
    fp = nn.Linear(6, 4)
    layer = BinaryLinear.from_float(fp, ScaledSignWeight(ClippedSTE()), ClippedSTE())
    assert layer.weight is fp.weight  # shares the latent Parameter, no copy
    x = torch.randn(5, 6)
    alpha = fp.weight.abs().mean(1, keepdim=True)
    expected = sign(x) @ (alpha * sign(fp.weight)).t() + fp.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_binary_conv_matches_hand_computation():
    torch.manual_seed(2)
    fp = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    layer = BinaryConv2d.from_float(fp, SignWeight(ClippedSTE()), ClippedSTE())
    x = torch.randn(2, 3, 7, 7)
    expected = F.conv2d(sign(x), sign(fp.weight), stride=2, padding=1)
    out = layer(x)
    assert torch.allclose(out, expected)
    assert torch.equal(out, out.round())  # +-1 products sum to integers


def _tiny_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.Sequential(nn.Conv2d(4, 4, 1)),  # a "downsample" stand-in is named below
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_binarize_policy_first_last_and_activations():
    net = _tiny_net()
    names = binarize_(net, "xnor", "clipped", keep_first_real=True, keep_last_real=True)
    assert names == ["2", "3.0"]
    assert type(net[0]) is nn.Conv2d and type(net[5]) is nn.Linear
    names = binarize_(_tiny := _tiny_net(), "bnn", "identity", keep_first_real=False, keep_last_real=False)
    assert names == ["0", "2", "3.0", "5"]
    assert _tiny[0].input_quantizer is None  # the network input is never binarized
    assert isinstance(_tiny[2].input_quantizer, IdentitySTE)
    assert binarize_(_tiny_net(), "fp") == []


def test_binarize_keeps_downsample_real_when_asked():
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(1, 2, 3))
    net.add_module("body", nn.Conv2d(2, 2, 3))
    net.add_module("downsample", nn.Sequential(nn.Conv2d(2, 2, 1)))
    net.add_module("head", nn.Conv2d(2, 2, 1))
    assert binarize_(net, "xnor", keep_downsample_real=True) == ["body"]


def test_binaryconnect_keeps_activations_real():
    net = _tiny_net()
    binarize_(net, "binaryconnect", keep_first_real=False, keep_last_real=False)
    assert all(layer.input_quantizer is None for _, layer in binary_layers(net))


def test_clip_invariant_after_real_optimizer_steps():
    torch.manual_seed(0)
    net = _tiny_net()
    binarize_(net, "bnn", keep_first_real=False, keep_last_real=False)
    real_conv = nn.Conv2d(1, 1, 1)  # not binarized: must not be clipped
    opt = torch.optim.SGD(list(net.parameters()), lr=50.0)  # huge steps push weights far out
    for _ in range(5):
        loss = net(torch.randn(8, 1, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip_latent_(net, 1.0)
        for _, layer in binary_layers(net):
            assert layer.weight.abs().max() <= 1.0
    assert max(layer.weight.abs().max().item() for _, layer in binary_layers(net)) == 1.0
    with torch.no_grad():
        real_conv.weight.fill_(5.0)
    clip_latent_(real_conv, 1.0)
    assert real_conv.weight.max() == 5.0


def test_clip_none_is_off():
    net = _tiny_net()
    binarize_(net, "bnn", keep_first_real=False)
    with torch.no_grad():
        net[2].weight.fill_(3.0)
    clip_latent_(net, None)
    assert net[2].weight.max() == 3.0


# ---- XNOR-Net K, stochastic BinaryConnect, ApproxSign, SwishSign, Bi-Real, ReActNet ----------

from bnn_train.binarize.quantizers import ApproxSignSTE, SwishSignSTE, ThresholdSign  # noqa: E402
from bnn_train.binarize.scaling import (ConvActivationScale, LinearActivationScale,  # noqa: E402
                                        MagnitudeSignWeight, StochasticSignWeight)


def test_approx_sign_gradient_matches_formula():
    x = torch.tensor([-1.5, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 1.0, 1.5], requires_grad=True)
    ApproxSignSTE()(x).backward(torch.ones_like(x))
    xd = x.detach()
    expected = torch.where((xd >= -1) & (xd < 0), 2 + 2 * xd, torch.where((xd >= 0) & (xd < 1), 2 - 2 * xd, 0.0))
    assert torch.allclose(x.grad, expected)
    assert x.grad.tolist() == pytest.approx([0, 0, 0.5, 1.5, 2, 1.5, 0.5, 0, 0])


@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_swish_sign_gradient_is_the_derivative_of_swish_sign(beta):
    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    SwishSignSTE(beta)(x).backward(torch.ones_like(x))
    # independent: autograd through SS_b(x) = 2 sigma(b x)(1 + b x (1 - sigma(b x))) - 1
    z = x.detach().clone().requires_grad_()
    s = torch.sigmoid(beta * z)
    (2 * s * (1 + beta * z * (1 - s)) - 1).sum().backward()
    assert torch.allclose(x.grad, z.grad)
    assert x.grad[20].item() == pytest.approx(beta)  # peak b at x = 0


def test_swish_sign_beta_comes_from_config():
    assert build_ste("swish_sign", beta=3.0).beta == 3.0


def _k_map_loop(x, kernel, stride, padding):
    """K by explicit loops: mean over channels of |x|, then the box average over each window."""
    a = x.abs().mean(1)  # [B, H, W]
    a = F.pad(a, (padding, padding, padding, padding))
    b, h, w = a.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    k = torch.zeros(b, 1, oh, ow)
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                k[n, 0, i, j] = a[n, i * stride:i * stride + kernel, j * stride:j * stride + kernel].mean()
    return k


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_xnor_k_map_against_explicit_loop(stride, padding):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, bias=False)
    x = torch.randn(2, 4, 7, 7)
    k = _k_map_loop(x, 3, stride, padding)
    assert torch.allclose(ConvActivationScale(conv)(x), k, atol=1e-6)
    layer = BinaryConv2d.from_float(conv, ScaledSignWeight(ClippedSTE()), ClippedSTE(), ConvActivationScale(conv))
    alpha = conv.weight.abs().mean((1, 2, 3)).view(1, -1, 1, 1)
    expected = F.conv2d(sign(x), sign(conv.weight), stride=stride, padding=padding) * k * alpha
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_xnor_k_for_linear_is_per_sample_mean_abs():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert LinearActivationScale()(x).flatten().tolist() == [2.0, 0.5]
    fp = nn.Linear(2, 3)
    layer = BinaryLinear.from_float(fp, SignWeight(ClippedSTE()), ClippedSTE(), LinearActivationScale())
    expected = (sign(x) @ sign(fp.weight).t()) * torch.tensor([[2.0], [0.5]]) + fp.bias
    assert torch.allclose(layer(x), expected)


def test_xnor_method_uses_k_map_unless_turned_off():
    net = _tiny_net()
    binarize_(net, "xnor", act_scale="k_map")
    assert isinstance(net[2].act_scale, ConvActivationScale)
    net = _tiny_net()
    binarize_(net, "xnor", act_scale="none")
    assert net[2].act_scale is None
    with pytest.raises(ConfigError, match="act_scale"):
        binarize_(_tiny_net(), "bwn", act_scale="k_map")


def test_stochastic_binaryconnect_sampling_probabilities():
    torch.manual_seed(0)
    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 0.8, 1.0]).repeat(20000, 1)
    q = StochasticSignWeight(IdentitySTE())
    samples = q(w)
    assert set(samples.unique().tolist()) == {-1.0, 1.0}
    p_plus = (samples > 0).float().mean(0)
    expected = ((w[0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(p_plus, expected, atol=0.015)
    q.eval()
    assert torch.equal(q(w[:1]), w[0].clamp(-1, 1)[None])  # E[W_b] at evaluation (paper sec. 2.6)


def test_stochastic_binaryconnect_gradient_is_straight_through():
    w = torch.tensor([-0.3, 0.4, 0.9], requires_grad=True)
    StochasticSignWeight(IdentitySTE())(w).backward(torch.tensor([1.0, 2.0, 3.0]))
    assert w.grad.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="stochastic"):
        binarize_(_tiny_net(), "xnor", stochastic=True)


def test_bireal_magnitude_aware_gradient_matches_documented_formula():
    """dL/dW_i = g_i * alpha * 1{|W_i| <= 1}; alpha's own derivative is dropped."""
    torch.manual_seed(4)
    w = (torch.randn(3, 2, 3, 3) * 0.9).requires_grad_()
    g = torch.randn_like(w)
    wb = MagnitudeSignWeight(ClippedSTE())(w)
    alpha = w.detach().abs().mean((1, 2, 3), keepdim=True)
    assert torch.allclose(wb, alpha * sign(w.detach()))
    wb.backward(g)
    assert torch.allclose(w.grad, g * alpha * (w.detach().abs() <= 1))
    # the gradient really is scaled by the magnitude: differs from the plain clipped STE
    assert not torch.allclose(w.grad, g * (w.detach().abs() <= 1))


def test_rsign_threshold_forward_and_gradients():
    rsign = ThresholdSign(3, ClippedSTE())
    with torch.no_grad():
        rsign.threshold.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.tensor([[[[0.4]], [[-0.4]], [[0.0]]], [[[0.6]], [[-0.6]], [[2.0]]]], requires_grad=True)  # [2,3,1,1]
    y = rsign(x)
    assert y.flatten().tolist() == [-1, 1, 1, 1, -1, 1]
    g = torch.arange(1.0, 7.0).view(2, 3, 1, 1)
    y.backward(g)
    window = ((x.detach() - rsign.threshold.detach().view(1, 3, 1, 1)).abs() <= 1).float()
    assert torch.equal(x.grad, g * window)
    assert torch.allclose(rsign.threshold.grad, -(g * window).sum((0, 2, 3)))
    assert rsign(torch.randn(4, 3)).shape == (4, 3)  # linear inputs too


def test_reactnet_binarize_uses_rsign_per_input_channel():
    net = _tiny_net()
    binarize_(net, "reactnet")
    assert isinstance(net[2].input_quantizer, ThresholdSign)
    assert net[2].input_quantizer.threshold.shape == (4,)
    assert isinstance(net[2].weight_quantizer, MagnitudeSignWeight)
