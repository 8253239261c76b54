"""The README's "Extending" section works as written: its scheme, estimator and model, registered by
running the snippets, train through the same config path as train.py."""

import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from bnn_train.binarize import SCHEMES, STES
from bnn_train.config import register_schemas, validate
from bnn_train.models import MODELS
from bnn_train.train.setup import build_network
from conftest import CONFIG_DIR, REPO


def section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


@pytest.fixture
def extended(tmp_path):
    text = section("Extending")
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "README.md", "exec"), {})
    register_schemas()
    configs = shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (configs / "method" / "layer_scale.yaml").write_text(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    for group, name in (("ste", "tanh_ste"), ("model", "tiny_cnn")):
        (configs / group / f"{name}.yaml").write_text(
            f"defaults:\n  - /schema/{group}/{name}@_here_\n  - _self_\nname: {name}\n")
    yield configs
    for registry, name in ((SCHEMES, "layer_scale"), (STES, "tanh_ste"), (MODELS, "tiny_cnn")):
        del registry[name], registry.schemas[name]


def test_the_extension_examples_train_through_the_config_path(extended):
    with initialize_config_dir(str(extended), version_base="1.3"):
        cfg = compose("train", overrides=["method=layer_scale", "ste=tanh_ste", "model=tiny_cnn", "model.width=4",
                                          "data=synthetic", "data.image_size=8"])
    validate(cfg)
    net, binarized = build_network(cfg, 3, 10, 8)
    assert binarized == ["3"]  # the middle conv: the first and the last layer stay real
    layer = net[3]
    assert type(layer.input_quantizer).__name__ == "TanhSTE"
    assert layer.weight_quantizer.per_channel is False
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    w = layer.weight.detach()
    alpha, s = w.abs().mean(), torch.where(w >= 0, 1.0, -1.0)
    # d/dx of sum(conv(sign(x), alpha s)): the conv transpose of ones, times the estimator 1 - tanh^2(x)
    ones = torch.ones(2, 4, 8, 8)
    expected = torch.nn.grad.conv2d_input(x.shape, alpha * s, ones, padding=1) * (1 - torch.tanh(x.detach()) ** 2)
    assert torch.allclose(x.grad, expected, atol=1e-5)
