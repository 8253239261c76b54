"""Pretraining stages: what stage 1 trains, that stage 2 starts from it, and reusing a stage 1."""

import json

import torch
from torch import nn

from bnn_train.binarize import binarize_, binary_layers
from bnn_train.train import stages
from bnn_train.train.setup import build_network
from conftest import compose_cfg

FAST = ["data=synthetic", "model=mlp", "model.width=32", "model.depth=2", "trainer.progress=false",
        "trainer.epochs=1", "trainer.limit_train_batches=3"]


def test_pretraining_stage_puts_relu_or_clip_where_sign_would_be():
    for act, module in (("relu", nn.ReLU), ("clip", nn.Hardtanh)):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        names = binarize_(net, "bireal", real_weights=True, input_act=act)
        assert names == ["1"]
        assert isinstance(net[1].input_quantizer, module) and net[1].weight_quantizer is None
        assert list(binary_layers(net)) == []  # real weights: not clipped, not counted as binary


def test_binary_act_stage_keeps_sign_with_real_weights():
    cfg = compose_cfg(*FAST, "method=bnn", "pretrain=binary_act")
    net, _ = build_network(cfg, 3, 10, 16, stage=stages.STAGE1["binary_act"])
    layer = net.features[4]
    assert layer.weight_quantizer is None and layer.input_quantizer is not None


def test_two_stages_run_and_stage2_starts_from_stage1(tmp_path, monkeypatch):
    cfg = compose_cfg(*FAST, "method=bnn", "pretrain=clip", "pretrain.epochs=2", "pretrain.lr=0.01")
    seen = {}
    original = stages.fit

    def spy(cfg, run_dir, choices=None, stage=None, init_from=None):
        seen[run_dir.name] = (cfg.trainer.epochs, cfg.optim.lr, stage, init_from)
        return original(cfg, run_dir, choices, stage=stage, init_from=init_from)

    monkeypatch.setattr(stages, "fit", spy)
    metrics = stages.run(cfg, tmp_path, {})
    assert seen["stage1"] == (2, 0.01, {"real_weights": True, "input_act": "clip"}, None)
    assert seen["stage2"][:3] == (1, cfg.optim.lr, None)
    assert seen["stage2"][3] == tmp_path / "stage1" / "checkpoints" / "last.pt"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["stages"]["stage1"]["epochs_completed"] == 2 and saved["stages"]["stage2"]["epochs_completed"] == 1
    assert metrics["best_val_acc"] == saved["stages"]["stage2"]["best_val_acc"]


def test_stage2_initial_weights_are_stage1_final_weights(tmp_path, monkeypatch):
    """The weights stage 2 takes its first step from, seen inside `fit` as `stages.run` calls it."""
    import bnn_train.train.loop as loop

    first_weights, models = [], []
    original = loop.train_step

    def spy(parts, *args, **kwargs):
        if not models or parts.model is not models[-1]:  # a stage's first step
            models.append(parts.model)
            first_weights.append({k: v.detach().clone() for k, v in parts.model.state_dict().items()})
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = compose_cfg(*FAST, "method=bnn", "pretrain=relu", "pretrain.epochs=1")
    stages.run(cfg, tmp_path, {})
    assert len(first_weights) == 2
    stage1_final = torch.load(tmp_path / "stage1" / "checkpoints" / "last.pt", weights_only=True)["model"]
    stage2_first = first_weights[1]
    assert stage2_first.keys() == stage1_final.keys()
    for key, value in stage2_first.items():
        assert torch.equal(value, stage1_final[key]), key
    assert any(not torch.equal(first_weights[0][k], v) for k, v in stage1_final.items())  # stage 1 did train


def test_pretrain_checkpoint_skips_stage1(tmp_path):
    first = compose_cfg(*FAST, "method=bnn", "pretrain=clip", "pretrain.epochs=1")
    stages.run(first, tmp_path / "a", {})
    ckpt = tmp_path / "a" / "stage1" / "checkpoints" / "last.pt"
    again = compose_cfg(*FAST, "method=bnn", "pretrain=clip", f"pretrain.checkpoint={ckpt}")
    metrics = stages.run(again, tmp_path / "b", {})
    assert not (tmp_path / "b" / "stage1").exists()
    assert metrics["stage1_checkpoint"] == str(ckpt) and set(metrics["stages"]) == {"stage2"}


def test_pretrain_keys_exist_without_pretraining():
    """Hydra composes a sweep's base config without its swept groups: `-m pretrain=relu,clip
    pretrain.epochs=5` must compose with the default pretrain=none too."""
    cfg = compose_cfg("pretrain.epochs=5", "pretrain.lr=0.01")
    assert cfg.pretrain.name == "none" and cfg.pretrain.epochs == 5
