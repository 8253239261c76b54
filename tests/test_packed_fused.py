"""Folding BatchNorm -> sign into integer thresholds, and the fp32 forms the fused epilogue
checks the torch modules against."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bnn_train.deploy import kernels
from bnn_train.deploy.fused import act_spec, apply_act, bn_affine, fma32, fold_thresholds
from bnn_train.models.activations import RPReLU


def test_fma32_rounds_like_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32).eval()
    bn.running_mean.normal_(0, 2), bn.running_var.uniform_(0.1, 3), bn.weight.data.normal_(), bn.bias.data.normal_()
    a, c = bn_affine(bn, 32)
    for _ in range(5):
        x = torch.randn(16, 32, 7, 9) * 8
        assert torch.equal(bn(x), fma32(x, a.view(1, -1, 1, 1), c.view(1, -1, 1, 1)))


def test_fma32_rounds_once_where_a_double_sum_would_round_twice():
    # x * a = 2^-24 (1 + k 2^-47) with 0 < k < 2^17, so 1 + x * a lies just above the midpoint
    # 1 + 2^-24 of two floats, closer than fp64 resolves: fp64 then fp32 rounds to even (1), one
    # rounding up (1 + 2^-23), as BatchNorm's fused multiply-add does.
    mx = next(m for m in range((1 << 23) + 1, 1 << 24) if 0 < -(-(1 << 47) // m) * m - (1 << 47) < 1 << 17)
    ma = -(-(1 << 47) // mx)
    x, a = torch.tensor([mx * 2.0**-24]), torch.tensor([ma * 2.0**-47])
    one = torch.tensor([1.0])
    assert (x.double() * a.double() + 1).float().item() == 1.0
    assert fma32(x, a, one).item() == 1 + 2**-23
    bn = nn.BatchNorm1d(1, eps=0.0).eval()
    bn.weight.data.copy_(a)
    bn.bias.data.copy_(one)
    assert bn(x[:, None]).item() == 1 + 2**-23


def test_bn_affine_refuses_batch_statistics():
    assert bn_affine(nn.BatchNorm2d(4, track_running_stats=False).eval(), 4) is None
    assert bn_affine(nn.BatchNorm2d(4).train(), 4) is None
    assert bn_affine(nn.BatchNorm2d(4).eval(), 5) is None


@pytest.mark.parametrize("act", [nn.Hardtanh(), nn.ReLU(), nn.Identity(), RPReLU(6)])
def test_act_spec_matches_the_module(act):
    for p in act.parameters():
        p.data.normal_()
    kind, params = act_spec(act, 6)
    x = torch.randn(4, 6, 3, 3) * 3
    assert torch.equal(apply_act(x, kind, params), act(x))


def test_unknown_activations_are_not_fused():
    assert act_spec(nn.GELU(), 6) is None
    assert act_spec(nn.Sigmoid(), 6) is None


def layer(c_in: int, c_out: int, alpha=None, bias=None):
    return SimpleNamespace(in_channels=c_in, out_channels=c_out, kernel_size=(1, 1), alpha=alpha, bias=bias)


def reference_bits(p: torch.Tensor, bn: nn.Module, act: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """sign(act(BN(P)) - t) = +1 from the modules, for P [N] integers -> [N, O] bools."""
    with torch.no_grad():
        v = act(bn(p.float()[:, None].expand(-1, bn.num_features).contiguous()))
    return v - t >= 0


def bn_with(mean, gamma, beta):
    bn = nn.BatchNorm1d(len(mean)).eval()
    bn.running_mean.copy_(torch.tensor(mean, dtype=torch.float32))
    bn.running_var.fill_(1 - bn.eps)  # sigma = 1: y = gamma * (P - mean) + beta exactly
    bn.weight.data.copy_(torch.tensor(gamma, dtype=torch.float32))
    bn.bias.data.copy_(torch.tensor(beta, dtype=torch.float32))
    return bn


def test_fold_takes_the_sign_flip_and_ties_into_account():
    # channel: 0 gamma > 0 with y = 0 at P = 1 (tie: sign(0) = +1), 1 the same with gamma < 0,
    # 2 gamma = 0 (constant +1), 3 tau between integers, 4 never +1 (mean beyond the range)
    bn = bn_with([1, 1, 0, 0, 9], [1, -1, 0, 2, 1], [0, 0, 0, 5, 0])
    fold = fold_thresholds(layer(4, 5), bn_affine(bn, 5), act_spec(nn.Identity(), 5), None)
    s, tau = fold
    assert (s[0].item(), tau[0].item()) == (1, 1)        # P >= 1
    assert (s[1].item(), tau[1].item()) == (-1, -1)      # -P >= -1, i.e. P <= 1
    assert (s[2].item(), tau[2].item()) == (1, -(2**31))  # always
    assert (s[3].item(), tau[3].item()) == (1, -2)       # 2P + 5 >= 0
    assert tau[4].item() == 2**31 - 1                    # never
    p = torch.arange(-4, 5)
    assert torch.equal(s * p[:, None] >= tau, reference_bits(p, bn, nn.Identity(), torch.zeros(5)))


def test_fold_equals_the_modules_on_every_integer_sum():
    torch.manual_seed(0)
    c_in, o = 40, 24  # n = 40: P in [-40, 40]
    bn = nn.BatchNorm1d(o).eval()
    bn.running_mean.normal_(0, 10), bn.running_var.uniform_(0.5, 30), bn.weight.data.normal_()
    bn.bias.data.normal_()
    alpha, t = torch.rand(o) + 0.1, torch.randn(o) * 0.3
    act = nn.Hardtanh()
    fold = fold_thresholds(layer(c_in, o, alpha=alpha), bn_affine(bn, o), act_spec(act, o), t)
    p = torch.arange(-c_in, c_in + 1)
    with torch.no_grad():
        ref = act(bn(p.float()[:, None] * alpha)) - t >= 0  # the training-time order: alpha * P, BN, act, sign
    assert torch.equal(fold[0] * p[:, None] >= fold[1], ref)


def test_a_non_monotone_tail_is_not_folded():
    # PReLU with slope -1 is |v|: sign(|P| - 1.5) is +1 on both ends of the range
    act = ("shifted_prelu", torch.stack([torch.zeros(3), -torch.ones(3), torch.zeros(3)]))
    assert fold_thresholds(layer(8, 3), None, act, torch.full((3,), 1.5)) is None


def export_and_load(tmp_path, size: int, *overrides: str):
    """(training-time network with randomized BN statistics, its packed twin) for `overrides`."""
    from omegaconf import OmegaConf

    import bnn_train.config  # noqa: F401  (registers the schemas compose_cfg needs)
    from bnn_train.bench.infer_speed import randomize_statistics_
    from bnn_train.binarize.transform import set_binary_precision
    from bnn_train.deploy.packed import export, load_packed
    from bnn_train.train.setup import build_network
    from conftest import compose_cfg

    cfg = compose_cfg(*overrides)
    torch.manual_seed(0)
    net = build_network(cfg, 3, 10, size)[0].eval()
    randomize_statistics_(net)
    export(net, OmegaConf.to_container(cfg, resolve=True), (3, size, 10), tmp_path / "m.bnn")
    set_binary_precision(net, "auto", "bf16", torch.device("cpu"))
    return net, load_packed(tmp_path / "m.bnn")


needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="C++ kernels could not be built here")


@needs_kernels
def test_bireal_plan_fuses_bn_shortcut_and_next_sign(tmp_path):
    from bnn_train.deploy.fused import PackedChain

    net, packed = export_and_load(tmp_path, 16, "model=bireal18", "method=bireal", "model.width_mult=0.25")
    chains = [m for m in packed.plan("nhwc").modules() if isinstance(m, PackedChain)]
    assert len(chains) == 16
    assert all(c.residual and c.bn_mul is not None and c.fold is None for c in chains)
    assert all(c.bits for c in chains[:-1]) and not chains[-1].bits  # the last block feeds the pool
    assert all(c.real == "nhwc" for c in chains)


@needs_kernels
@pytest.mark.parametrize("overrides,expect", [
    (("model=resnet18", "method=xnor", "model.width_mult=0.25"), {"k_mean_in_epilogue": 15, "folded": 0}),
    (("model=resnet18", "method=bnn", "model.width_mult=0.25"), {"folded": 8, "shortcut_in_epilogue": 8}),
    (("model=bireal18", "method=reactnet", "model.width_mult=0.25"), {"shortcut_in_epilogue": 16, "act_in_epilogue": 16}),
    (("model=mlp", "method=bnn", "model.width=80"), {"folded": 2}),
    (("model=alexnet", "method=xnor", "model.block_order=xnor", "model.width_mult=0.25"), {"folded": 0}),
])
def test_whole_network_plans_are_exact_with_randomized_statistics(tmp_path, overrides, expect):
    # BN statistics far from the identity make signs flip where a wrong threshold or rounding would show
    net, packed = export_and_load(tmp_path, 16, *overrides)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        for inputs in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(packed(inputs), net(inputs))
    summary = packed.summary("nhwc")
    if kernels.aten_lanes() == 0:
        expect.pop("k_mean_in_epilogue", None)
    assert {k: summary[k] for k in expect} == expect
