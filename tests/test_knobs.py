"""The literature's training switches: weight scales, affine outputs, {0,1} and stochastic
activations, the quantization-error regularizer and eps, width multiplier, squared hinge loss."""


import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnn_train.binarize import binarize_, binary_layers, sign
from bnn_train.binarize.layers import AffineOutput
from bnn_train.binarize.quantizers import ClippedSTE, IdentitySTE, StochasticSign, ZeroOneSign
from bnn_train.binarize.scaling import LearnableScaleSignWeight, ScaledSignWeight, mean_abs_scale
from bnn_train.errors import ConfigError
from bnn_train.models import build_model
from bnn_train.train.losses import quantization_errors, quantization_penalty, squared_hinge
from bnn_train.train.loop import fit
from bnn_train.train.setup import build_network
from conftest import compose_cfg

W = torch.tensor([[0.5, -0.25, 1.0, -0.25], [-0.2, 0.2, 0.4, 0.0]])
W_NONZERO = torch.tensor([[0.5, -0.25, 1.0, -0.25], [-0.2, 0.2, 0.4, 0.6]])  # d|w|/dw is +-1 everywhere


def test_mean_abs_scale_per_channel_and_per_layer():
    assert mean_abs_scale(W).flatten().tolist() == pytest.approx([0.5, 0.2])
    assert mean_abs_scale(W, per_channel=False).flatten().tolist() == pytest.approx([0.35])
    layer_q = ScaledSignWeight(IdentitySTE(), per_channel=False)(W)
    assert torch.allclose(layer_q, 0.35 * sign(W))


def test_layer_scale_gradient_is_the_full_chain_rule():
    """dL/dW_i = alpha g_i + sign(W_i)/N sum_j g_j sign(W_j) with one alpha over all N weights."""
    w = W_NONZERO.clone().requires_grad_()
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, -3.0, 1.0, 2.0]])
    ScaledSignWeight(IdentitySTE(), per_channel=False)(w).backward(g)
    s = sign(W_NONZERO)
    expected = W_NONZERO.abs().mean() * g + s * (g * s).sum() / 8
    assert torch.allclose(w.grad, expected)


def test_learnable_scale_starts_at_mean_abs_gets_its_gradient_and_trains():
    q = LearnableScaleSignWeight(ClippedSTE(), W)
    assert q.scale.flatten().tolist() == pytest.approx([0.5, 0.2])
    w = W.clone().requires_grad_()
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, -3.0, 1.0, 2.0]])
    q(w).backward(g)
    assert q.scale.grad.flatten().tolist() == pytest.approx((g * sign(W)).sum(1).tolist())  # sum_i G_i sign(W_i)
    assert torch.allclose(w.grad, q.scale.detach() * g)  # alpha g ste'(W); |W| <= 1 everywhere
    before = q.scale.detach().clone()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert not torch.equal(q.scale.detach(), before)


def test_affine_output_formula_gradients_and_update():
    aff = AffineOutput(2)
    with torch.no_grad():
        aff.scale.copy_(torch.tensor([2.0, 0.5]))
        aff.shift.copy_(torch.tensor([1.0, -1.0]))
    out = aff(torch.tensor([[3.0, 4.0]]), (-1,))
    assert out.tolist() == [[7.0, 1.0]]  # 2*3 + 1, 0.5*4 - 1
    out.sum().backward()
    assert aff.scale.grad.tolist() == [3.0, 4.0] and aff.shift.grad.tolist() == [1.0, 1.0]
    before = aff.scale.detach().clone()
    torch.optim.SGD(aff.parameters(), lr=0.1).step()
    assert not torch.equal(aff.scale.detach(), before)


def test_affine_output_is_applied_by_binarized_layers():
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    binarize_(net, "xnor", keep_first_real=False, keep_last_real=False, affine_output=True)
    x = torch.randn(5, 4)
    plain = net[1].affine
    net[1].affine = None
    ref = net(x)
    net[1].affine = plain
    with torch.no_grad():
        plain.scale.fill_(3.0)
        plain.shift.fill_(0.5)
    assert torch.allclose(net(x), 3 * ref + 0.5)


def test_zero_one_activations_and_their_dot_product_identity():
    """W . a = (W . q(x) + W . 1) / 2 for a = (q(x) + 1) / 2."""
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    a = ZeroOneSign(ClippedSTE())(x)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    pm1_net = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 3, bias=False))
    zo_net = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 3, bias=False))
    zo_net.load_state_dict(pm1_net.state_dict())
    binarize_(pm1_net, "bnn", keep_first_real=False, keep_last_real=False)
    binarize_(zo_net, "bnn", keep_first_real=False, keep_last_real=False, act_levels="01")
    layer_pm1, layer_01 = pm1_net[1], zo_net[1]
    wb = sign(layer_pm1.weight)
    assert torch.allclose(layer_01(x), (layer_pm1(x) + wb.sum(1)) / 2)
    xr = x.clone().requires_grad_()
    ZeroOneSign(ClippedSTE())(xr).sum().backward()
    assert torch.equal(xr.grad, 0.5 * (x.abs() <= 1).float())


def test_stochastic_activations_follow_hard_sigmoid_and_are_deterministic_at_eval():
    torch.manual_seed(0)
    x = torch.tensor([-1.5, -0.6, 0.0, 0.3, 0.9, 2.0]).repeat(20000, 1)
    q = StochasticSign(IdentitySTE())
    p_plus = (q(x) > 0).float().mean(0)
    assert torch.allclose(p_plus, ((x[0] + 1) / 2).clamp(0, 1), atol=0.015)
    q.eval()
    assert torch.equal(q(x[:1]), sign(x[:1]))


def test_quantization_error_matches_its_definition_and_penalty_gradients():
    net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W)
    binarize_(net, "bwn", keep_first_real=False)
    eps = quantization_errors(net)
    q = mean_abs_scale(W) * sign(W)
    assert eps["0"].item() == pytest.approx((W - q).abs().sum().item() / 8)
    net[0].weight.grad = None
    quantization_penalty(net, "l1").backward()
    assert torch.allclose(net[0].weight.grad, torch.sign(W - q) / 8)
    net[0].weight.grad = None
    quantization_penalty(net, "l2").backward()
    assert torch.allclose(net[0].weight.grad, 2 * (W - q) / 8)


def test_squared_hinge_by_hand():
    logits = torch.tensor([[0.5, -2.0, 0.8]])
    # t = [+1, -1, -1]: max(0, 1 - 0.5)^2 = 0.25, max(0, 1 - 2)^2 = 0, max(0, 1 + 0.8)^2 = 3.24
    assert squared_hinge(logits, torch.tensor([0])).item() == pytest.approx((0.25 + 0 + 3.24) / 3)


def _params(name, mult, **extra):
    cfg = OmegaConf.create({"name": name, "width_mult": mult, "act": "relu", **extra})
    return sum(p.numel() for p in build_model(cfg, 3, 10, 32, "relu").parameters())


@pytest.mark.parametrize("name,extra", [("resnet20", {}), ("resnet18", {}), ("bireal18", {}),
                                        ("alexnet", {"fc_width": 64})])
def test_width_multiplier_scales_parameters_quadratically(name, extra):
    ratio = _params(name, 2.0, **extra) / _params(name, 1.0, **extra)
    assert 3.0 < ratio < 4.2  # conv weights grow 4x; stem input, fc output and BN grow less


def test_width_multiplier_on_the_mlp():
    cfg = OmegaConf.create({"name": "mlp", "depth": 2, "width": 100, "width_mult": 1.5})
    net = build_model(cfg, 1, 10, 8, "hardtanh")
    assert net.features[1].weight.shape == (150, 64)


def _binary(net):
    return [layer for _, layer in binary_layers(net)]


def _scale_is(alpha_of):
    def check(net, overrides, tmp_path):
        for layer in _binary(net):
            w = layer.weight.detach()
            assert torch.allclose(layer.weight_quantizer(w), alpha_of(w) * sign(w))
    return check


def _all_layers(predicate):
    def check(net, overrides, tmp_path):
        assert all(predicate(layer) for layer in _binary(net))
    return check


def _first_binary_input(net):
    return next(layer for layer in _binary(net) if layer.input_quantizer is not None)


def _levels_are_0_1(net, overrides, tmp_path):
    layer = _first_binary_input(net).eval()
    assert set(layer.input_quantizer(torch.randn(16, layer.in_features)).unique().tolist()) == {0.0, 1.0}


def _stochastic(net, overrides, tmp_path):
    layer = _first_binary_input(net).train()
    x = torch.full((4000, layer.in_features), 0.5)  # P(+1) = (0.5 + 1) / 2 = 0.75 while training
    assert 0.72 < (layer.input_quantizer(x) > 0).float().mean().item() < 0.78
    assert (layer.eval().input_quantizer(x) > 0).all()


def _penalty_in_the_trained_loss(reg):
    """The loop adds reg_weight * penalty to the loss it trains on (checked on the first step)."""
    def check(net, overrides, tmp_path):
        from bnn_train.train import loop

        seen, real = [], loop.train_step

        def spy(parts, x, y, *args, **kwargs):
            seen.append(None if parts.penalty is None else parts.penalty().item())
            return real(parts, x, y, *args, **kwargs)

        run_cfg = compose_cfg(*overrides, "trainer.epochs=1", "trainer.limit_train_batches=1",
                              "trainer.limit_val_batches=1", "trainer.progress=false", "trainer.checkpoint=false")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "train_step", spy)
            loop.fit(run_cfg, tmp_path, {})
        torch.manual_seed(0)
        fresh, _ = build_network(run_cfg, 3, 10, 8)
        assert seen[0] == pytest.approx(0.5 * quantization_penalty(fresh, reg).item(), rel=1e-4)
    return check


BINARY_WEIGHTS = ["bnn", "xnor", "bwn", "bireal", "binaryconnect"]
# switch -> (schemes it applies to, its effect on the built network)
SWITCHES = {
    "method.weight_scale=none": (BINARY_WEIGHTS, _scale_is(lambda w: 1.0)),
    "method.weight_scale=mean_abs": (BINARY_WEIGHTS, _scale_is(mean_abs_scale)),
    "method.weight_scale=learnable": (BINARY_WEIGHTS, _all_layers(
        lambda layer: isinstance(layer.weight_quantizer, LearnableScaleSignWeight))),
    "method.weight_scale_granularity=layer": (["xnor", "bwn", "bireal"],
                                              _scale_is(lambda w: mean_abs_scale(w, per_channel=False))),
    "method.affine_output=true": (BINARY_WEIGHTS, _all_layers(lambda layer: isinstance(layer.affine, AffineOutput))),
    "method.act_levels=01": (["bnn", "xnor", "bireal"], _levels_are_0_1),
    "method.act_stochastic=true": (["bnn", "xnor", "bireal"], _stochastic),
    "method.reg=l1": (["bnn", "bwn"], _penalty_in_the_trained_loss("l1")),
    "method.reg=l2": (["xnor", "bireal"], _penalty_in_the_trained_loss("l2")),
    "model.width_mult=0.5": (["bnn", "xnor"], lambda net, overrides, tmp_path: _all_layers(
        lambda layer: layer.weight.shape[0] in (16, 10))(net, overrides, tmp_path)),
}


@pytest.mark.parametrize("switch,method", [(s, m) for s, (ms, _) in SWITCHES.items() for m in ms])
def test_every_switch_changes_the_built_network(switch, method, tmp_path):
    overrides = ["data=synthetic", "data.image_size=8", "model=mlp", "model.width=32", f"method={method}", switch]
    if "reg=" in switch:
        overrides.append("method.reg_weight=0.5")
    torch.manual_seed(0)
    net, binarized = build_network(compose_cfg(*overrides), 3, 10, 8)
    assert binarized
    SWITCHES[switch][1](net, overrides, tmp_path)


@pytest.mark.parametrize("overrides,match", [
    (["method=bwn", "method.act_levels=01"], "act_levels"),
    (["method=binaryconnect", "method.act_stochastic=true"], "act_stochastic"),
    (["method=binaryconnect", "method.stochastic=true", "method.weight_scale=mean_abs"], "weight_scale"),
])
def test_switches_that_do_not_apply_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg = compose_cfg("data=synthetic", "model=mlp", *overrides)
        build_network(cfg, 3, 10, 8)


def test_weight_scale_on_a_real_weight_scheme_is_rejected():
    with pytest.raises(ConfigError, match="weight_scale"):
        binarize_(nn.Sequential(nn.Linear(2, 2)), "fp", weight_scale="learnable")


def test_quantization_error_is_logged_per_layer(tmp_path):
    cfg = compose_cfg("data=synthetic", "model=mlp", "model.width=32", "method=bwn", "trainer.epochs=1",
                      "trainer.progress=false", "trainer.log_every_n_steps=1", "method.reg=l1", "loss=squared_hinge")
    fit(cfg, tmp_path, {})
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    eps_tags = {t for t in tags if t.startswith("quant_error/")}
    binarized = build_network(cfg, 3, 10, 16)[1]
    assert len(binarized) == 2 and eps_tags == {f"quant_error/{name}" for name in binarized}
