"""Every registered model x scheme builds, runs forward and backward, and keeps its scheme's layer
policy; the two rules models follow; a scheme, an estimator and a model registered from outside."""

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnn_train.binarize import SCHEMES, STES, BinaryScheme, SignSTE, binary_layers, get_scheme
from bnn_train.binarize.scaling import SignWeight
from bnn_train.config import validate
from bnn_train.errors import ConfigError
from bnn_train.models import MODELS, ModelConfig, build_model, has_per_conv_shortcut
from bnn_train.train.setup import build_network
from conftest import compose_cfg

# Small instances of each model (the rest of their keys: their schema defaults).
SMALL = {"mlp": {"depth": 2, "width": 32}, "alexnet": {"fc_width": 64}}


def model_node(model: str) -> dict:
    keys = {**OmegaConf.to_container(OmegaConf.structured(MODELS.schemas[model])), **SMALL.get(model, {})}
    if model == "resnet20":
        keys["shortcut"] = "per_conv"  # resnet18 keeps the block form: both ResNet forms are covered
    return {**keys, "name": model}


def make_cfg(model, method):
    return OmegaConf.create({"model": model_node(model), "method": {"name": method},
                             "ste": {"name": SCHEMES[method].default_ste}})


def sensible(model, method):
    return not SCHEMES[method].needs_per_conv_shortcut or has_per_conv_shortcut(model_node(model))


@pytest.mark.parametrize("method", sorted(SCHEMES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_forward_backward_and_layer_policy(model, method):
    if not sensible(model, method):
        with pytest.raises(ConfigError, match=f"method={method} model={model}"):
            validate(compose_cfg(f"model={model}", f"method={method}"))
        return
    torch.manual_seed(0)
    net, binarized = build_network(make_cfg(model, method), in_channels=3, num_classes=7, image_size=16)
    x = torch.randn(4, 3, 16, 16)
    out = net(x)
    assert out.shape == (4, 7)
    out.logsumexp(1).mean().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    scheme = get_scheme(method)
    assert (layers[0] in binarized) is (method != "fp" and not scheme.keep_first_real)
    assert (layers[-1] in binarized) is (method != "fp" and not scheme.keep_last_real)
    downsample = [n for n in layers if "downsample" in n.split(".")]
    assert not (scheme.keep_downsample_real and set(downsample) & set(binarized))
    assert (len(binarized) == 0) == (method == "fp")
    assert all(layer.weight.grad is not None for _, layer in binary_layers(net))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_layers_are_registered_in_forward_order(model):
    """The rule `binarize_`'s first/last policy relies on (models/base.py)."""
    net = build_model(OmegaConf.create(model_node(model)), 3, 7, 16, "relu").eval()
    called = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, inp, out, name=name: called.append(name))
    net(torch.randn(2, 3, 16, 16))
    registered = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert called[0] == registered[0] and called[-1] == registered[-1]
    assert sorted(called) == sorted(registered)


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


def test_activation_under_model_act_auto():
    def acts(model, method):
        net, _ = build_network(make_cfg(model, method), 3, 10, 16)
        return {type(m).__name__ for m in net.modules()} & {"ReLU", "Hardtanh", "RPReLU"}

    assert acts("mlp", "bnn") == {"Hardtanh"}  # sign after ReLU would be +1 everywhere
    assert acts("mlp", "fp") == {"ReLU"}
    assert acts("bireal18", "bireal") == set()  # the sign is the nonlinearity; shortcuts stay unclipped
    assert acts("bireal18", "reactnet") == {"RPReLU"}
    assert acts("resnet20", "irnet") == {"Hardtanh"}  # IR-Net's per-conv blocks clip after each add


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model=vgg: unknown model; choose one of"):
        build_model(OmegaConf.create({"name": "vgg"}), 3, 10, 32, "relu")


def test_checkpointed_state_is_latent_after_training_steps():
    """state_dict holds the latent weights (the Parameters themselves), never sign()ed copies, also
    after optimizer steps have moved them."""
    net, binarized = build_network(make_cfg("mlp", "bnn"), 1, 10, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(16, 1, 8, 8)).logsumexp(1).mean().backward()
        opt.step()
    sd = net.state_dict()
    for name in binarized:
        layer = net.get_submodule(name)
        assert sd[f"{name}.weight"].data_ptr() == layer.weight.data_ptr()
        assert not torch.equal(sd[f"{name}.weight"].abs(), torch.ones_like(layer.weight))
        assert torch.equal(layer.weight_quantizer(layer.weight).abs(), torch.ones_like(layer.weight))


# ---- extension from outside the package: one class each, registered, then used by name ----------


class HalfIdentitySTE(SignSTE):
    """A toy estimator: d sign/dx := 1/2."""

    name = "half_identity"

    def pseudo_grad(self, x):
        return torch.full_like(x, 0.5)


@dataclass
class HalfIdentityConfig:
    name: str = "half_identity"


@dataclass
class SignOnlyEvenLayers(BinaryScheme):
    """A toy scheme: sign(W) weights, sign activations, scale 2 on every output."""

    name: str = "toy_scheme"
    scale: float = 2.0

    binary_activations = True
    default_ste = "half_identity"

    def activation_scale(self, layer):
        return _Const(self.scale)


class _Const(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.tensor(self.value)


@dataclass
class TinyConfig(ModelConfig):
    name: str = "toy_model"
    hidden: int = 3


def build_tiny(cfg: TinyConfig, in_channels, num_classes, image_size, act_layer):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, cfg.hidden), act_layer(cfg.hidden),
                         nn.Linear(cfg.hidden, cfg.hidden), act_layer(cfg.hidden), nn.Linear(cfg.hidden, num_classes))


@pytest.fixture
def toys():
    STES.register("half_identity", HalfIdentityConfig)(HalfIdentitySTE)
    SCHEMES.register("toy_scheme")(SignOnlyEvenLayers)
    MODELS.register("toy_model", TinyConfig)(build_tiny)
    yield
    for registry, name in ((STES, "half_identity"), (SCHEMES, "toy_scheme"), (MODELS, "toy_model")):
        del registry[name], registry.schemas[name]


def test_a_scheme_an_estimator_and_a_model_registered_from_outside(toys):
    cfg = OmegaConf.create({"model": {"name": "toy_model", "act": "auto", "width_mult": 1.0, "hidden": 4},
                            "method": {"name": "toy_scheme", "keep_first_real": True, "keep_last_real": True},
                            "ste": {"name": "half_identity"}})
    torch.manual_seed(0)
    net, binarized = build_network(cfg, 1, 2, 2)
    assert binarized == ["3"]  # the middle Linear; first and last kept real by the scheme's keys
    layer = net[3]
    assert isinstance(layer.weight_quantizer, SignWeight) and isinstance(layer.input_quantizer, HalfIdentitySTE)
    x = torch.randn(5, 4, requires_grad=True)
    out = layer(x)
    sx, sw = torch.where(x >= 0, 1.0, -1.0), torch.where(layer.weight >= 0, 1.0, -1.0)
    assert torch.allclose(out, 2.0 * sx.detach() @ sw.T + layer.bias)
    out.sum().backward()
    assert torch.allclose(x.grad, 0.5 * (2.0 * sw.sum(0)).expand(5, 4))  # the toy estimator's 1/2
    assert net[2].__class__ is nn.Hardtanh  # model.act=auto with binary activations
