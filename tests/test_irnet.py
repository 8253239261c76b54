"""IR-Net: EDE's gradient and schedule, Libra-PB's weights and gradient, the per-conv ResNet-20
with option-A shortcuts, and the recipe's network."""

import pytest
import torch
from omegaconf import OmegaConf

from bnn_train.binarize import binarize_, set_epoch_
from bnn_train.binarize.product import FusedBinaryConv2d
from bnn_train.binarize.irnet import EDESTE, LibraSignWeight
from bnn_train.errors import FieldError
from bnn_train.models import build_model, has_per_conv_shortcut
from bnn_train.models.resnet import PerConvBlock, ZeroPadShortcut
from bnn_train.train.loop import fit
from conftest import compose_cfg


def test_ede_gradient_is_k_t_sech_squared():
    ede = EDESTE(t_min=0.01, t_max=10.0)
    ede.set_epoch(1, 4)  # t = 10^(-2 + 3 / 4)
    t = 10 ** (-2 + 3 / 4)
    assert ede.t == pytest.approx(t) and ede.k == pytest.approx(1 / t)
    x = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    out = ede(x)
    assert torch.equal(out, torch.where(x >= 0, 1.0, -1.0).double())
    out.backward(torch.full_like(x, 2.0))
    expected = 2 * (1 / t) * t * (1 - torch.tanh(t * x.detach()) ** 2)
    assert torch.allclose(x.grad, expected)


@pytest.mark.parametrize("epoch,epochs,t", [(0, 10, 1e-3), (5, 10, 10 ** -1.0), (9, 10, 10 ** 0.6)])
def test_ede_schedule_is_log_linear_from_t_min_to_t_max(epoch, epochs, t):
    ede = EDESTE()
    ede.set_epoch(epoch, epochs)
    assert ede.t == pytest.approx(t) and ede.k == pytest.approx(max(1 / t, 1.0))


def test_ede_rejects_a_range_that_is_not_one():
    with pytest.raises(FieldError, match="t_min"):
        EDESTE(t_min=1.0, t_max=0.1)


def test_libra_weights_are_signs_of_standardized_weights_times_a_power_of_two():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * 0.05 + 0.3  # every weight positive-ish: sign(W) would be all +1
    wb = LibraSignWeight(EDESTE())(w)
    flat = w.flatten(1)
    w_hat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    alpha = 2.0 ** torch.round(torch.log2(w_hat.abs().mean(1)))
    assert torch.equal(wb.flatten(1), alpha[:, None] * torch.where(w_hat >= 0, 1.0, -1.0))
    assert (wb.flatten(1) < 0).any()  # balanced: about half of each channel is -1


def test_libra_latent_grad_matches_autograd_through_the_standardization():
    torch.manual_seed(1)
    ede = EDESTE()
    ede.set_epoch(3, 5)
    binarizer = LibraSignWeight(ede)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    binarizer(w).backward(g)
    s, alpha = binarizer.split(w.detach())
    # the closed form of the docstring, written out for one channel
    o = 2
    flat = w.detach()[o].flatten()
    sigma, n = flat.std(), flat.numel()
    w_hat = (flat - flat.mean()) / sigma
    h = alpha[o] * g[o].flatten() * ede.pseudo_grad(w_hat)
    by_hand = (h - h.mean() - w_hat * (h * w_hat).sum() / (n - 1)) / sigma
    assert torch.allclose(w.grad[o].flatten(), by_hand)
    assert torch.allclose(binarizer.latent_grad(w, g.clone(), s, alpha), w.grad)


def test_fused_conv_gradients_equal_the_float_chain_for_libra():
    torch.manual_seed(2)
    binarizer = LibraSignWeight(EDESTE())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    conv = ((1, 1), (1, 1), (1, 1))
    out = FusedBinaryConv2d.apply(torch.sign(x.detach()) + 0 * x, w, None, binarizer, conv, "fp32", "fp32")
    ref = torch.nn.functional.conv2d(torch.sign(x.detach()), binarizer(w), padding=1)
    assert torch.allclose(out, ref)
    g = torch.randn_like(out)
    (gw_fused,) = torch.autograd.grad(out, w, g)
    (gw_float,) = torch.autograd.grad(ref, w, g)
    assert torch.allclose(gw_fused, gw_float, atol=1e-5)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    out = ZeroPadShortcut(4, 8, 2)(x)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[:, :2].abs().sum() == 0 and out[:, 6:].abs().sum() == 0


@pytest.mark.parametrize("shortcut,downsample,params", [
    ("block", "option_a", 269_722),  # He et al.'s 0.27 M
    ("per_conv", "option_a", 269_722),  # same weights, more shortcuts
    ("block", "conv", 272_474),
])
def test_resnet20_parameter_counts(shortcut, downsample, params):
    net = build_model(OmegaConf.create({"name": "resnet20", "shortcut": shortcut, "downsample": downsample}),
                      3, 10, 32, "relu")
    assert sum(p.numel() for p in net.parameters()) == params
    projections = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())
    assert projections == (downsample == "conv")


def test_per_conv_block_adds_a_shortcut_around_each_conv():
    block = PerConvBlock(4, 4, 1, lambda c: torch.nn.Identity()).eval()
    for conv in (block.conv1, block.conv2):
        torch.nn.init.zeros_(conv.weight)
    x = torch.randn(2, 4, 5, 5)
    bn_shift1 = block.bn1(torch.zeros(2, 4, 5, 5))  # BN of an all-zero conv output: its shift
    h = bn_shift1 + x
    expected = block.bn2(torch.zeros_like(h)) + h
    assert torch.allclose(block(x), expected)
    assert has_per_conv_shortcut({"name": "resnet20", "shortcut": "per_conv"})
    assert not has_per_conv_shortcut({"name": "resnet20", "shortcut": "block"})


def test_the_recipe_builds_irnets_network():
    cfg = compose_cfg("experiment=resnet20_cifar10_1w1a", "data=synthetic", "data.image_size=32")
    from bnn_train.train.setup import build_network
    net, binarized = build_network(cfg, 3, 10, 32)
    assert len(binarized) == 18  # every 3x3 conv but the stem; fc real
    assert sum(isinstance(m, PerConvBlock) for m in net.modules()) == 9
    assert sum(isinstance(m, ZeroPadShortcut) for m in net.modules()) == 2
    assert isinstance(net.head_bn, torch.nn.BatchNorm1d)
    assert all(isinstance(m, torch.nn.Hardtanh) for name, m in net.named_modules() if name.endswith(".act1"))
    conv = net.stages[0][0].conv1
    assert isinstance(conv.weight_quantizer, LibraSignWeight)
    assert isinstance(conv.weight_quantizer.ste, EDESTE) and isinstance(conv.input_quantizer, EDESTE)
    assert cfg.method.clip_latent is None and cfg.optim.decay_binary is True


def test_trainer_schedules_ede_per_epoch_and_resume_continues_it(tmp_path, monkeypatch):
    seen = []
    original = EDESTE.set_epoch

    def spy(self, epoch, epochs):
        seen.append((epoch, epochs))
        original(self, epoch, epochs)

    monkeypatch.setattr(EDESTE, "set_epoch", spy)
    common = ["method=irnet", "model=resnet20", "model.shortcut=per_conv", "data=synthetic", "data.image_size=8",
              "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.progress=false"]
    fit(compose_cfg(*common, "trainer.epochs=2"), tmp_path, {})
    assert {call for call in seen if call != (0, 1)} == {(0, 2), (1, 2)}  # (0, 1): each quantizer's __init__
    seen.clear()
    fit(compose_cfg(*common, "trainer.epochs=3", "trainer.resume=true"), tmp_path, {})
    assert {call for call in seen if call != (0, 1)} == {(2, 3)}  # only the epoch the resumed run trains


def test_set_epoch_reaches_every_scheduled_quantizer():
    net = build_model(OmegaConf.create({"name": "resnet20"}), 3, 10, 8, "hardtanh")
    binarize_(net, "irnet", {"name": "ede", "t_min": 0.001, "t_max": 10.0})
    set_epoch_(net, 7, 10)
    edes = [m for m in net.modules() if isinstance(m, EDESTE)]
    layers = [m for m in net.modules() if getattr(m, "weight_quantizer", None) is not None]
    assert len(edes) == 2 * len(layers) == 2 * 20  # weights and inputs of 18 3x3 convs + 2 projections
    assert all(m.t == pytest.approx(10 ** (-3 + 4 * 0.7)) and m.k == pytest.approx(10 ** (3 - 4 * 0.7)) for m in edes)
