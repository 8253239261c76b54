"""Bi-Real Net-18/34 (per-conv identity shortcuts, avg-pool downsampling) and ReActNet's RPReLU."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnn_train.binarize import BinaryConv2d, binarize_
from bnn_train.models import ACTIVATIONS, MODELS, build_model, has_per_conv_shortcut
from bnn_train.models.activations import RPReLU
from bnn_train.models.bireal import BiRealBlock

CONVS = {"bireal18": 16, "bireal34": 32}


def make(name="bireal18", image_size=16, act="identity", **keys):
    return build_model(OmegaConf.create({"name": name, "stem": "auto", **keys}), 3, 10, image_size, act)


def convs3x3_in_stages(net):
    return [m for m in net.stages.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("image_size,stem_kernel", [(16, 3), (64, 7)])
def test_shape_and_stem_follow_input_size(name, image_size, stem_kernel):
    net = make(name, image_size)
    assert net.stem[0].kernel_size == (stem_kernel, stem_kernel)
    assert isinstance(net.stem[-1], nn.MaxPool2d) == (stem_kernel == 7)
    assert net(torch.randn(2, 3, image_size, image_size)).shape == (2, 10)


def test_stem_can_be_forced():
    assert make(image_size=16, stem="imagenet").stem[0].kernel_size == (7, 7)
    assert make(image_size=64, stem="cifar").stem[0].kernel_size == (3, 3)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_layer_counts_and_registration_order(name):
    net = make(name)
    convs = convs3x3_in_stages(net)
    assert len(convs) == CONVS[name]
    assert all(isinstance(b, BiRealBlock) for s in net.stages for b in s)
    assert [len(s) for s in net.stages] == ([4, 4, 4, 4] if name == "bireal18" else [6, 8, 12, 6])
    assert [s[0].conv.out_channels for s in net.stages] == [64, 128, 256, 512]
    layers = [n for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert layers[0] == "stem.0" and layers[-1] == "fc"  # what binarize_ calls first and last
    assert len(layers) == 1 + CONVS[name] + 3 + 1  # stem + 3x3 convs + 3 downsample 1x1 + fc


def test_per_conv_shortcut_is_identity():
    net = make().eval()
    block = net.stages[0][1]
    assert block.downsample is None
    with torch.no_grad():
        block.conv.weight.zero_()
        block.bn.weight.zero_()
        block.bn.bias.zero_()
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(x), x)
    # with a real conv, out = BN(conv(x)) + x exactly
    torch.nn.init.normal_(block.conv.weight)
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    assert torch.allclose(block(x), block.bn(block.conv(x)) + x)


def test_without_shortcut_there_is_none():
    net = make(shortcut=False).eval()
    assert not any(b.shortcut for b in net.modules() if isinstance(b, BiRealBlock))
    assert not [n for n, _ in net.named_modules() if n.endswith("downsample")]
    assert all(b.downsample is None for s in net.stages for b in s)
    block = net.stages[0][1]
    with torch.no_grad():
        block.conv.weight.zero_()
        block.bn.bias.zero_()
    assert torch.equal(block(torch.randn(2, 64, 8, 8)), torch.zeros(2, 64, 8, 8))
    assert len(convs3x3_in_stages(net)) == 16
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shortcut", [True, False])
def test_per_conv_shortcut_from_config_matches_the_built_model(name, shortcut):
    cfg = {"name": name, "shortcut": shortcut} if name in CONVS else {"name": name}
    if name == "mlp":
        cfg.update(depth=1, width=8)
    net = build_model(OmegaConf.create(cfg), 3, 10, 16, "relu")
    built = any(isinstance(m, BiRealBlock) and m.shortcut for m in net.modules())
    assert built is has_per_conv_shortcut(cfg) is (name in CONVS and shortcut)


def test_downsample_branch_is_avgpool_conv1x1_bn():
    net = make()
    branches = {n: m for n, m in net.named_modules() if n.endswith("downsample") and m is not None}
    assert sorted(branches) == ["stages.1.0.downsample", "stages.2.0.downsample", "stages.3.0.downsample"]
    for ds in branches.values():
        pool, conv, bn = ds
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
        assert isinstance(bn, nn.BatchNorm2d)
    # stride-2 block: BN(conv(x)) + BN(conv1x1(avgpool(x)))
    block = net.stages[1][0].eval()
    x = torch.randn(2, 64, 8, 8)
    expected = block.bn(block.conv(x)) + block.downsample[2](block.downsample[1](nn.functional.avg_pool2d(x, 2)))
    assert torch.allclose(block(x), expected)


def test_odd_input_sizes_keep_shortcut_shapes_aligned():
    assert make(image_size=15)(torch.randn(2, 3, 15, 15)).shape == (2, 10)


def test_downsample_layers_follow_the_keep_real_policy():
    net = make()
    binarize_(net, "xnor", keep_first_real=True, keep_last_real=True, keep_downsample_real=True)
    kinds = {n: type(m) for n, m in net.named_modules()}
    assert kinds["stages.1.0.downsample.1"] is nn.Conv2d
    assert kinds["stem.0"] is nn.Conv2d and kinds["fc"] is nn.Linear
    assert sum(k is BinaryConv2d for k in kinds.values()) == 16


def test_act_layer_gets_channel_count():
    net = make(act="rprelu")
    acts = [m for m in net.modules() if isinstance(m, RPReLU)]
    assert len(acts) == 1 + 16  # stem + one per block
    assert [b.act.gamma.numel() for s in net.stages for b in s] == [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4


@pytest.mark.parametrize("name,shortcut,scheme", [
    *[(name, True, scheme) for name in sorted(CONVS) for scheme in ("fp", "bnn", "xnor")],
    ("bireal18", False, "xnor"),
])
def test_forward_backward_binarized(name, shortcut, scheme):
    torch.manual_seed(0)
    net = make(name, image_size=8, act="identity", shortcut=shortcut)  # 8 px: 1x1 maps in the last stage
    done = binarize_(net, scheme, keep_first_real=True, keep_last_real=True)
    assert len(done) == (0 if scheme == "fp" else CONVS[name] + (3 if shortcut else 0))
    out = net(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


# RPReLU ----------------------------------------------------------------------------------------


def _rprelu_by_hand(x, gamma, beta, zeta):
    out = torch.empty_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]):
        idx = tuple(idx.tolist())
        c = idx[1]
        y = x[idx].item() - gamma[c]
        out[idx] = (y if y > 0 else beta[c] * y) + zeta[c]
    return out


def test_rprelu_init():
    act = RPReLU(3)
    assert act.gamma.tolist() == [0, 0, 0] and act.zeta.tolist() == [0, 0, 0] and act.beta.tolist() == [0.25] * 3
    x = torch.randn(2, 3)
    assert torch.allclose(act(x), torch.where(x > 0, x, 0.25 * x))


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 3)])
def test_rprelu_matches_formula(shape):
    gamma, beta, zeta = [0.5, -1.0, 0.0], [0.25, 0.1, -0.5], [1.0, -2.0, 0.3]
    act = RPReLU(3)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor(gamma))
        act.beta.copy_(torch.tensor(beta))
        act.zeta.copy_(torch.tensor(zeta))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.allclose(act(x), _rprelu_by_hand(x, gamma, beta, zeta), atol=1e-6)


def test_rprelu_parameter_gradients():
    torch.manual_seed(0)
    act = RPReLU(3)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.2, -0.3, 0.0]))
        act.beta.copy_(torch.tensor([0.25, 0.5, -0.1]))
    x = torch.randn(4, 3, 2, 2).requires_grad_()
    g = torch.randn(4, 3, 2, 2)
    act(x).backward(g)
    y = x.detach() - act.gamma.detach().view(1, -1, 1, 1)
    slope = torch.where(y > 0, torch.ones_like(y), act.beta.detach().view(1, -1, 1, 1))
    dims = (0, 2, 3)
    assert torch.allclose(act.gamma.grad, -(g * slope).sum(dims), atol=1e-5)  # d/dgamma = -f'(y)
    assert torch.allclose(act.beta.grad, (g * y.clamp(max=0)).sum(dims), atol=1e-5)  # d/dbeta = min(0, y)
    assert torch.allclose(act.zeta.grad, g.sum(dims), atol=1e-5)  # d/dzeta = 1
    assert torch.allclose(x.grad, g * slope, atol=1e-6)


def test_every_activation_factory_takes_channels():
    for name, factory in ACTIVATIONS.items():
        assert isinstance(factory(8), nn.Module), name
    assert "identity" in ACTIVATIONS and ACTIVATIONS["rprelu"](8).gamma.numel() == 8
