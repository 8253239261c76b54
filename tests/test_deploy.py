"""Packed 1-bit inference: the XNOR/popcount kernels are integer-exact, and an exported model
predicts exactly what the training-time model predicts."""

import pytest
import torch
import torch.nn.functional as F

from bnn_train.binarize import sign
from bnn_train.deploy import kernels
from bnn_train.deploy.fused import PackedChain
from bnn_train.deploy.packed import export, kernel_weight, load_packed, pack_words
from bnn_train.train.loop import fit
from bnn_train.train.setup import build_network
from conftest import compose_cfg

ops = kernels.load()
needs_kernels = pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
IMPLS = [name for name in ("scalar", "avx2", "avx512")
         if ops is not None and kernels.IMPLS[name] <= ops.best_impl()]


def test_pack_words_sets_bit_c_for_channel_c():
    signs = torch.zeros(1, 70, dtype=torch.bool)
    signs[0, [0, 5, 63, 64, 69]] = True
    words = pack_words(signs)
    assert words.shape == (1, 2)
    assert words[0, 0].item() == (1 | (1 << 5)) - 2**63  # bit 63 is int64's sign bit
    assert words[0, 1].item() == 1 | (1 << 5)


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c,o,k,stride,padding,dilation", [
    (64, 32, 3, 1, 1, 1), (100, 40, 3, 2, 1, 1), (3, 5, 3, 1, 0, 1), (130, 64, 1, 1, 0, 1),
    (16, 16, 3, 1, 2, 2), (512, 33, 3, 1, 1, 1)])
def test_packed_conv_is_integer_exact(impl, c, o, k, stride, padding, dilation):
    torch.manual_seed(0)
    x, w = torch.randn(2, c, 7, 6), torch.randn(o, c, k, k)
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=padding, dilation=dilation)
    out = ops.binary_conv(ops.pack_channels(x, kernels.IMPLS[impl]), kernel_weight(w >= 0), c, k, k, stride, stride, padding, padding,
                          dilation, dilation, kernels.IMPLS[impl])
    assert out.dtype == torch.int32
    assert torch.equal(out.permute(0, 3, 1, 2).float(), ref)


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
def test_pack_channels_matches_pack_words(impl):
    x = torch.randn(2, 130, 3, 4)
    x[0, 0, 0, 0], x[0, 17, 0, 0] = 0.0, -0.0  # sign(0) = sign(-0) = +1
    assert torch.equal(ops.pack_channels(x, kernels.IMPLS[impl]), pack_words(x.permute(0, 2, 3, 1) >= 0))


# folds: whether BatchNorm -> sign folds into integer thresholds somewhere (a binary layer followed,
# with no real shortcut in between, by a binary layer without XNOR-Net's K: the MLP's hidden layers,
# conv1 -> conv2 inside a ResNet basic block, AlexNet's fc layers); elsewhere BN, the shortcut
# addition and the activation run in the kernel's float epilogue.
@pytest.mark.parametrize("method,model,folds", [
    ("xnor", "resnet20", False), ("bnn", "mlp", True), ("reactnet", "bireal18", False), ("bireal", "resnet20", True),
    ("irnet", "resnet20", True), ("bnn", "resnet20", True), ("bnn", "alexnet", True)])
def test_exported_model_predicts_exactly_like_the_training_time_model(tmp_path, method, model, folds):
    overrides = ["data=synthetic", "data.image_size=8", f"model={model}", f"method={method}", "trainer.epochs=1",
                 "trainer.limit_train_batches=3", "trainer.progress=false"]
    if model == "mlp":
        overrides.append("model.width=96")
    if model == "alexnet":
        overrides.append("model.width_mult=0.25")
    cfg = compose_cfg(*overrides)
    fit(cfg, tmp_path / "run", {})
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    net, _ = build_network(cfg, 3, 10, 8)
    net.load_state_dict(state["model"])
    net.eval()
    from omegaconf import OmegaConf
    sizes = export(net, OmegaConf.to_container(cfg, resolve=True), (3, 8, 10), tmp_path / "m.bnn")
    packed, layerwise = load_packed(tmp_path / "m.bnn"), load_packed(tmp_path / "m.bnn", fuse=False)
    from bnn_train.binarize.transform import set_binary_precision
    set_binary_precision(net, "auto", "bf16", torch.device("cpu"))  # the trainer's default forward
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        for inputs in (x, x.contiguous(memory_format=torch.channels_last)):
            ref = net(inputs)
            assert torch.equal(packed(inputs), ref)
            assert torch.equal(layerwise(inputs), ref)
    assert sizes["packed_bytes"] < sizes["fp32_model_bytes"]
    if ops is not None:
        chains = [m for m in packed.plan("nchw").modules() if isinstance(m, PackedChain)]
        assert chains and all(c.bits or c.real for c in chains)
        assert any(c.fold is not None for c in chains) == folds
