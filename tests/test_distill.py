"""Distillation: the kd and distribution losses against hand computations, and the frozen teacher
loaded from a bnn-train checkpoint or a plain (ours or torchvision's) state dict."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from omegaconf import OmegaConf

from bnn_train.errors import CheckpointError, ConfigError, UserError
from bnn_train.train.distill import (
    build_teacher,
    distillation_loss,
    distribution_loss,
    kd_loss,
    load_teacher,
)
from bnn_train.train.setup import build_network


def teacher_cfg(path, **kw):
    return OmegaConf.create({"name": "checkpoint", "path": str(path), "model": None, "loss": "kd",
                             "temperature": 4.0, "alpha": 0.9, **kw})


def one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert message and "\n" not in message, repr(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([1, 2])


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(s, t, tau=1.0):
    """mean over rows of sum_c pT_c log(pT_c / pS_c), written out with math."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow, tau), softmax(trow, tau)
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return total / len(s)


def hand_ce(s, y):
    return sum(-math.log(softmax(row)[c]) for row, c in zip(s.tolist(), y.tolist())) / len(s)


def test_kd_loss_matches_a_hand_computation():
    tau, alpha = 2.0, 0.7
    expected = alpha * tau ** 2 * hand_kl(S, T, tau) + (1 - alpha) * hand_ce(S, Y)
    got = distillation_loss(S, T, Y, OmegaConf.create({"loss": "kd", "temperature": tau, "alpha": alpha}))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(S, T, Y, tau, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_kd_with_alpha_zero_is_cross_entropy():
    got = kd_loss(S, T, Y, temperature=4.0, alpha=0.0)
    assert got.item() == pytest.approx(F.cross_entropy(S, Y).item(), rel=1e-6)
    assert got.item() == pytest.approx(hand_ce(S, Y), rel=1e-6)


def test_kd_with_identical_logits_has_zero_kl():
    assert kd_loss(S, S.clone(), Y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distribution_loss(S, S.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_distribution_loss_matches_hand_computation_and_its_gradient():
    s = S.clone().requires_grad_(True)
    cfg = OmegaConf.create({"loss": "distribution", "temperature": 4.0, "alpha": 0.5})  # both ignored
    loss = distillation_loss(s, T, torch.tensor([0, 0]), cfg)  # labels ignored too
    assert loss.item() == pytest.approx(hand_kl(S, T), rel=1e-6)
    loss.backward()
    expected_grad = (F.softmax(S, 1) - F.softmax(T, 1)) / len(S)
    torch.testing.assert_close(s.grad, expected_grad)


def test_teacher_logits_get_no_gradient_and_unknown_loss_is_rejected():
    t = T.clone().requires_grad_(True)
    kd_loss(S.clone().requires_grad_(True), t, Y).backward()
    assert t.grad is None
    with pytest.raises(ConfigError) as e:
        distillation_loss(S, T, Y, OmegaConf.create({"loss": "mse"}))
    one_line(e, "teacher.loss=mse", "kd, distribution")


def test_teacher_none_builds_no_teacher():
    assert build_teacher(OmegaConf.create({"name": "none"}), 3, 10, 8) is None


# ---------------------------------------------------------------------------------------------
# Teacher from a bnn-train checkpoint
# ---------------------------------------------------------------------------------------------


def randomize_bn_stats(net):
    """So that eval mode matters: BatchNorm running statistics away from 0 / 1."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def save_run_checkpoint(tmp_path, *overrides, channels=3, classes=10, size=8):
    cfg = compose_cfg("model=mlp", "model.width=16", "model.depth=2", *overrides)
    torch.manual_seed(0)
    net, binarized = build_network(cfg, channels, classes, size)
    randomize_bn_stats(net).eval()
    path = tmp_path / "teacher.pt"
    torch.save({"model": net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return net, binarized, path


@pytest.mark.parametrize("method", ["fp", "xnor"])
def test_teacher_from_run_checkpoint_gives_the_same_logits_and_stays_frozen(tmp_path, method):
    net, binarized, path = save_run_checkpoint(tmp_path, f"method={method}")
    assert bool(binarized) == (method != "fp")
    teacher = load_teacher(teacher_cfg(path), 3, 10, 8, "cpu")
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(teacher(x), expected)  # binarization rebuilt, weights loaded

    assert all(not p.requires_grad for p in teacher.parameters())
    parent = torch.nn.ModuleDict({"teacher": teacher, "student": torch.nn.Linear(2, 2)})
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent["student"].training
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected)  # still eval-mode BatchNorm after .train()


def test_teacher_from_a_fit_run(tmp_path):
    from bnn_train.train.loop import fit

    cfg = compose_cfg("data=synthetic", "model=mlp", "model.width=16", "model.depth=1", "method=fp",
                      "trainer.epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
                      "trainer.progress=false", "data.image_size=8", "device=cpu")
    fit(cfg, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    teacher = load_teacher(teacher_cfg(path), 3, 10, 8, "cpu")
    net, _ = build_network(cfg, 3, 10, 8)
    net.load_state_dict(torch.load(path, weights_only=True)["model"])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net.eval()(x))


def test_teacher_model_that_contradicts_the_checkpoint_is_rejected(tmp_path):
    _, _, path = save_run_checkpoint(tmp_path, "method=fp")
    with pytest.raises(ConfigError) as e:
        load_teacher(teacher_cfg(path, model="resnet18"), 3, 10, 8, "cpu")
    one_line(e, str(path), "teacher.model=resnet18", "model=mlp")


# ---------------------------------------------------------------------------------------------
# Teacher from a plain state dict
# ---------------------------------------------------------------------------------------------


def test_torchvision_resnet18_state_dict_gives_torchvision_logits(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    randomize_bn_stats(tv).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    teacher = load_teacher(teacher_cfg(path, model="resnet18"), 3, 10, 64, "cpu")
    assert teacher.net.stem[0].kernel_size == (7, 7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
    torch.testing.assert_close(teacher(x), expected, rtol=1e-4, atol=1e-5)
    # the imagenet stem is chosen from the weights, also for inputs where stem=auto picks cifar
    assert load_teacher(teacher_cfg(path, model="resnet18"), 3, 10, 32, "cpu").net.stem[0].kernel_size == (7, 7)


def test_our_plain_state_dict_loads_directly(tmp_path):
    cfg = compose_cfg("model=resnet20", "method=fp")
    torch.manual_seed(0)
    net, _ = build_network(cfg, 1, 4, 8)
    randomize_bn_stats(net).eval()
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    teacher = load_teacher(teacher_cfg(path, model="resnet20"), 1, 4, 8, "cpu")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x))


def test_plain_state_dict_without_teacher_model_is_rejected(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(ConfigError) as e:
        load_teacher(teacher_cfg(path), 1, 2, 2, "cpu")
    one_line(e, str(path), "teacher.model=NAME", "resnet18")


# ---------------------------------------------------------------------------------------------
# Mismatches and bad files: one line naming the file
# ---------------------------------------------------------------------------------------------


def test_class_count_mismatch(tmp_path):
    _, _, path = save_run_checkpoint(tmp_path, "method=fp", classes=100)
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_cfg(path), 3, 10, 8, "cpu")
    one_line(e, f"teacher {path}: 100 classes, the data has 10")


def test_input_channel_mismatch(tmp_path):
    torch.manual_seed(0)
    net, _ = build_network(compose_cfg("model=resnet20", "method=fp"), 3, 10, 8)
    path = tmp_path / "rgb.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_cfg(path, model="resnet20"), 1, 10, 8, "cpu")
    one_line(e, f"teacher {path}: takes 3-channel images, the data has 1 channels")

    _, _, mlp_path = save_run_checkpoint(tmp_path, "method=fp", channels=3)  # an MLP: input values
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_cfg(mlp_path), 1, 10, 8, "cpu")
    one_line(e, str(mlp_path), "192 input values", "1x8x8 = 64")


def test_state_dict_of_another_architecture(tmp_path):
    torch.manual_seed(0)
    net, _ = build_network(compose_cfg("model=resnet20", "method=fp"), 3, 10, 8)
    path = tmp_path / "resnet20.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_cfg(path, model="resnet18"), 3, 10, 8, "cpu")
    one_line(e, str(path), "do not fit teacher.model=resnet18")


@pytest.mark.parametrize("content", ["text", "list", "missing", "empty", "module"])
def test_files_that_are_not_a_teacher(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("hello\n")
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "module":
        torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: refused by weights_only
    with pytest.raises(UserError) as e:
        load_teacher(teacher_cfg(path, model="mlp"), 1, 2, 2, "cpu")
    message = one_line(e, f"teacher {path}:")
    assert "torch.save(model.state_dict(), PATH)" in message  # says what to pass instead


def test_dict_without_model_or_tensors(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_cfg(path, model="mlp"), 1, 2, 2, "cpu")
    one_line(e, str(path), "neither a bnn-train checkpoint", "'optimizer'")
