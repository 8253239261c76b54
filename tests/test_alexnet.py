"""AlexNet with BatchNorm: ImageNet/CIFAR variants, standard and XNOR-Net layer order."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnn_train.binarize import BinaryConv2d, BinaryLinear, binarize_
from bnn_train.errors import ConfigError
from bnn_train.models import build_model

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def make(image_size=16, act="hardtanh", **keys):
    return build_model(OmegaConf.create({"name": "alexnet", **keys}), 3, 10, image_size, act)


def leaves(net):
    """Leaf modules in registration order (= forward order)."""
    return [m for m in net.modules() if not list(m.children())]


def layers(net):
    return [m for m in net.modules() if isinstance(m, LAYERS)]


@pytest.mark.parametrize("block_order", ["standard", "xnor"])
@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_shapes(image_size, block_order):
    net = make(image_size, block_order=block_order)
    assert net(torch.randn(2, 3, image_size, image_size)).shape == (2, 10)


def test_variant_follows_input_size():
    cifar, imagenet = make(32), make(64)
    assert [m.kernel_size for m in layers(cifar)[:5]] == [(3, 3)] * 5
    assert [m.kernel_size for m in layers(imagenet)[:5]] == [(11, 11), (5, 5), (3, 3), (3, 3), (3, 3)]
    assert layers(imagenet)[0].stride == (4, 4)
    assert [m.out_channels for m in layers(cifar)[:5]] == [96, 256, 384, 384, 256]
    assert [m.out_channels for m in layers(imagenet)[:5]] == [96, 256, 384, 384, 256]
    assert [m.out_features for m in layers(cifar)[5:]] == [1024, 1024, 10]
    assert [m.out_features for m in layers(imagenet)[5:]] == [4096, 4096, 10]
    assert layers(imagenet)[5].in_features == 256 * 6 * 6  # after the 6x6 adaptive average pool
    assert layers(cifar)[5].in_features == 256 * 4 * 4  # 32 px after three 2x2 max-pools
    assert [m.kernel_size for m in cifar.modules() if isinstance(m, nn.MaxPool2d)] == [2, 2, 2]
    assert [m.kernel_size for m in imagenet.modules() if isinstance(m, nn.MaxPool2d)] == [3, 3, 3]
    assert layers(make(64, variant="cifar"))[0].kernel_size == (3, 3)
    assert layers(make(32, variant="imagenet"))[0].kernel_size == (11, 11)


def test_fc_width():
    assert [m.out_features for m in layers(make(16, fc_width=64))[5:]] == [64, 64, 10]
    assert [m.out_features for m in layers(make(16, fc_width="auto"))[5:]] == [1024, 1024, 10]


@pytest.mark.parametrize("keys,match", [({"variant": "vgg"}, "model.variant"),
                                        ({"block_order": "bn_first"}, "model.block_order")])
def test_bad_options_are_config_errors(keys, match):
    with pytest.raises(ConfigError, match=match):
        make(16, **keys)


def test_standard_order_is_layer_bn_act():
    seq = leaves(make(16))
    idx = [i for i, m in enumerate(seq) if isinstance(m, LAYERS)]
    for i in idx[:-1]:
        assert isinstance(seq[i + 1], NORMS) and isinstance(seq[i + 2], nn.Hardtanh)
    assert idx[-1] == len(seq) - 1  # logits straight from the last fc
    assert sum(isinstance(m, NORMS) for m in seq) == 7


def test_xnor_order_puts_bn_and_act_before_every_layer_but_the_first():
    seq = leaves(make(16, block_order="xnor"))
    idx = [i for i, m in enumerate(seq) if isinstance(m, LAYERS)]
    assert idx[0] == 0 and isinstance(seq[1], nn.BatchNorm2d) and isinstance(seq[2], nn.Hardtanh)
    assert isinstance(seq[3], nn.MaxPool2d)  # first conv: conv -> BN -> act -> pool
    for i in idx[1:]:
        assert isinstance(seq[i - 2], NORMS) and isinstance(seq[i - 1], nn.Hardtanh)
        norm = seq[i - 2]
        assert norm.num_features == (seq[i].in_channels if isinstance(seq[i], nn.Conv2d) else seq[i].in_features)
    # conv -> pool: max-pooling sees the conv's real output, not binary values
    assert isinstance(seq[idx[1] + 1], nn.MaxPool2d) and isinstance(seq[idx[4] + 1], nn.MaxPool2d)
    assert idx[-1] == len(seq) - 1
    # the first conv's own BN, then one before each of the other 7 layers (as in XNOR-Net's code)
    assert sum(isinstance(m, NORMS) for m in seq) == 8


def test_first_and_last_layers_for_binarize():
    for order in ("standard", "xnor"):
        net = make(16, block_order=order)
        done = binarize_(net, "xnor", keep_first_real=True, keep_last_real=True)
        assert len(done) == 6
        assert type(layers(net)[0]) is nn.Conv2d and type(layers(net)[-1]) is nn.Linear
        binary = [m for m in net.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
        assert all(m.input_quantizer is not None for m in binary)


@pytest.mark.parametrize("scheme", ["fp", "bnn", "xnor"])
@pytest.mark.parametrize("block_order", ["standard", "xnor"])
@pytest.mark.parametrize("image_size", [16, 64])
def test_forward_backward_binarized(image_size, block_order, scheme):
    torch.manual_seed(0)
    net = make(image_size, block_order=block_order, fc_width=64)
    binarize_(net, scheme, keep_first_real=True, keep_last_real=True)
    out = net(torch.randn(4, 3, image_size, image_size))
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
