"""Every registered model x scheme builds, runs forward and backward, and keeps its layer policy."""

import pytest
import torch
from omegaconf import OmegaConf

from bnn_train.binarize import SCHEMES, binary_layers, get_scheme
from bnn_train.config import check_combination
from bnn_train.errors import ConfigError
from bnn_train.models import MODELS, build_model, has_per_conv_shortcut
from bnn_train.train.setup import build_network

CONFIG = {"mlp": {"depth": 2, "width": 32}, "resnet18": {"stem": "auto"}, "resnet20": {},
          "alexnet": {"variant": "auto", "block_order": "standard", "fc_width": 64},
          "bireal18": {"stem": "auto", "shortcut": True}, "bireal34": {"stem": "auto", "shortcut": True}}
POLICY = {"fp": (True, True), "binaryconnect": (False, False), "bwn": (True, True), "bnn": (False, False),
          "xnor": (True, True), "bireal": (True, True), "reactnet": (True, True), "irnet": (True, True)}


def sensible(model, method):
    return not get_scheme(method).needs_per_conv_shortcut or has_per_conv_shortcut(
        OmegaConf.create({"name": model, **CONFIG[model]}))


def make_cfg(model, method, image_size=16):
    return OmegaConf.create({
        "model": {"name": model, "act": "auto", **CONFIG[model]},
        "method": {"name": method, "keep_first_real": POLICY[method][0], "keep_last_real": POLICY[method][1],
                   "keep_downsample_real": False, "clip_latent": 1.0},
        "ste": {"name": "clipped"},
    })


def test_every_model_and_scheme_has_a_test_config():
    assert set(MODELS) == set(CONFIG) and set(SCHEMES) == set(POLICY)


@pytest.mark.parametrize("method", sorted(SCHEMES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_forward_backward(model, method):
    cfg = make_cfg(model, method)
    if not sensible(model, method):
        with pytest.raises(ConfigError, match=f"method={method} model={model}"):
            check_combination(cfg.model, cfg.method)
        return
    torch.manual_seed(0)
    net, binarized = build_network(make_cfg(model, method), in_channels=3, num_classes=7, image_size=16)
    x = torch.randn(4, 3, 16, 16)
    out = net(x)
    assert out.shape == (4, 7)
    out.logsumexp(1).mean().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert (len(binarized) == 0) == (method == "fp")
    assert all(layer.weight.grad is not None for _, layer in binary_layers(net))


def test_resnet18_stem_follows_input_size():
    cfg = OmegaConf.create({"name": "resnet18", "stem": "auto"})
    small = build_model(cfg, 3, 10, 32, "relu")
    large = build_model(cfg, 3, 10, 224, "relu")
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert large.stem[0].kernel_size == (7, 7) and isinstance(large.stem[-1], torch.nn.MaxPool2d)
    forced = build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet"}), 3, 10, 32, "relu")
    assert forced.stem[0].kernel_size == (7, 7)


def test_resnet20_shape():
    net = build_model(OmegaConf.create({"name": "resnet20"}), 3, 10, 32, "relu")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 1 stem + 3 stages x 3 blocks x 2: with the fc, the 20 layers
    assert [s[0].conv1.out_channels for s in net.stages] == [16, 32, 64]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_depth_width():
    net = build_model(OmegaConf.create({"name": "mlp", "depth": 3, "width": 64}), 1, 10, 28, "hardtanh")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 64), (64, 64), (64, 10)]


def test_binary_activations_get_hardtanh_by_default():
    net, _ = build_network(make_cfg("mlp", "bnn"), 1, 10, 8)
    assert any(isinstance(m, torch.nn.Hardtanh) for m in net.modules())
    net, _ = build_network(make_cfg("mlp", "fp"), 1, 10, 8)
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    net, _ = build_network(make_cfg("bireal18", "bireal"), 3, 10, 16)
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.Hardtanh)) for m in net.modules())
    net, _ = build_network(make_cfg("bireal18", "reactnet"), 3, 10, 16)
    assert any(type(m).__name__ == "RPReLU" for m in net.modules())


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        build_model(OmegaConf.create({"name": "vgg"}), 3, 10, 32, "relu")


def test_checkpointed_state_is_latent():
    """state_dict holds the latent weights (same tensors as the Parameters), never sign()ed copies."""
    net, _ = build_network(make_cfg("mlp", "bnn"), 1, 10, 8)
    sd = net.state_dict()
    w = sd["features.1.weight"]
    assert not torch.equal(w.abs(), torch.ones_like(w))
