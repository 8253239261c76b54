"""Learning-rate schedules and weight-decay groups."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnn_train.train.optim import build_optimizer, build_scheduler, lr_factor


def sched(**kw):
    return OmegaConf.create({"warmup_epochs": 0, **kw})


def test_cosine_goes_from_one_to_min_ratio():
    cfg = sched(name="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cfg, 25, 10, 5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg, 50, 10, 5) == pytest.approx(0.1)


def test_linear_warmup_then_cosine():
    cfg = sched(name="cosine", min_lr_ratio=0.0, warmup_epochs=1)
    assert [lr_factor(cfg, s, 4, 3) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(cfg, 8, 4, 3) == pytest.approx(0.5)  # halfway through the 8 cosine steps


def test_step_schedule_multiplies_at_milestones():
    cfg = sched(name="step", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(cfg, e * 10, 10, 6) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_constant():
    assert lr_factor(sched(name="constant"), 123, 10, 5) == 1.0


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    s = build_scheduler(opt, sched(name="step", milestones=[1], gamma=0.5), steps_per_epoch=2, epochs=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1])


@pytest.mark.parametrize("decay_binary,expected", [(False, 0.0), (True, 0.01)])
def test_weight_decay_spares_binary_weights_unless_asked(decay_binary, expected):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    cfg = OmegaConf.create({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                            "weight_decay": 0.01, "decay_binary": decay_binary})
    opt = build_optimizer(model, cfg, binary_weights=[model[1].weight])
    real, binary = opt.param_groups
    assert real["weight_decay"] == 0.01 and binary["weight_decay"] == expected
    assert binary["params"] == [model[1].weight]
    assert len(real["params"]) == 3


def test_glorot_latent_lr_scale_gives_each_binary_layer_its_factor():
    model = nn.Sequential(nn.Linear(784, 1024), nn.Linear(1024, 10))
    cfg = OmegaConf.create({"name": "adam", "lr": 0.003, "betas": [0.9, 0.999], "weight_decay": 0.0,
                            "decay_binary": False, "latent_lr_scale": "glorot"})
    opt = build_optimizer(model, cfg, binary_weights=[model[0].weight, model[1].weight])
    real, first, last = opt.param_groups
    assert real["lr"] == 0.003
    assert first["lr"] == pytest.approx(0.003 / math.sqrt(1.5 / (784 + 1024)))
    assert last["lr"] == pytest.approx(0.003 / math.sqrt(1.5 / (1024 + 10)))
    s = build_scheduler(opt, sched(name="step", milestones=[1], gamma=0.5), steps_per_epoch=1, epochs=2)
    opt.step()
    s.step()
    assert first["lr"] == pytest.approx(0.0015 / math.sqrt(1.5 / (784 + 1024)))
