"""End-to-end runs: learning, what a run writes, the clip invariant in checkpoints, resume."""

import json
import math
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnn_train.errors import CheckpointError
from bnn_train.train import loop
from bnn_train.train.distill import load_teacher
from bnn_train.train.loop import fit
from bnn_train.train.optim import build_optimizer
from bnn_train.train.setup import binary_weights, build_network
from bnn_train.train.step import StepParts, Tally, train_step
from conftest import REPO, SHARED_DATA, compose_cfg

FAST = ["data=synthetic", "model=mlp", "model.width=64", "model.depth=2", "trainer.progress=false"]


def run(tmp_path, *overrides, choices=None):
    cfg = compose_cfg(*FAST, *overrides)
    return cfg, fit(cfg, tmp_path, choices or {"method": cfg.method.name})


def test_synthetic_run_learns_and_writes_the_contract(tmp_path):
    cfg, metrics = run(tmp_path, "method=bnn", "trainer.epochs=3")
    assert metrics["best_val_acc"] > 0.6  # chance is 0.1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("best_val_acc", "final_val_acc", "epochs_completed", "train_samples_per_s", "train_time_s"):
        assert key in saved
    assert saved["epochs_completed"] == 3 and saved["status"] == "completed"
    assert 0 <= saved["final_val_acc"] <= 1 and saved["train_samples_per_s"] > 0
    assert saved["config"]["optim.lr"] == cfg.optim.lr and saved["choices"]["method"] == "bnn"

    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert ckpt["progress"]["epoch"] == 3 and isinstance(ckpt["config"], dict)
    latent = [ckpt["model"][f"{name}.weight"] for name in ckpt["binarized_layers"]]
    assert latent and all(w.abs().max() <= 1.0 for w in latent)
    assert not all(torch.equal(w.abs(), torch.ones_like(w)) for w in latent)  # latent, not sign()ed

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("latent/") for t in tags["histograms"])
    assert "flip/all" in tags["scalars"] and any(t.startswith("flip/features") for t in tags["scalars"])
    assert "model/summary/text_summary" in tags["tensors"]
    assert "OPs = BOPs/64 + FLOPs" in (tmp_path / "model_summary.md").read_text()
    assert saved["model_summary"]["bops"] > 0 and saved["model_summary"]["size_packed_mb"] > 0
    assert [e.value for e in events.Scalars("val/acc")][-1] == pytest.approx(saved["final_val_acc"])


def test_hparams_are_recorded(tmp_path):
    run(tmp_path, "method=xnor", "trainer.epochs=1")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "hparams/best_val_acc" in events.Tags()["scalars"]
    plugin = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin
    assert b"method" in plugin["_hparams_/session_start_info"]


@pytest.mark.parametrize("method", ["fp", "binaryconnect", "bwn", "bnn", "xnor"])
def test_every_method_trains_above_chance(tmp_path, method):
    _, metrics = run(tmp_path, f"method={method}", "trainer.epochs=2")
    assert metrics["best_val_acc"] > 0.3


def test_limits_cap_batches(tmp_path):
    _, metrics = run(tmp_path, "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    assert metrics["steps"] == 6


def test_sgd_step_schedule_and_bf16(tmp_path):
    _, metrics = run(tmp_path, "optim=sgd", "optim.lr=0.05", "sched=step", "sched.milestones=[2]",
                     "trainer.precision=bf16", "trainer.epochs=3")
    assert [h["lr"] for h in metrics["history"]] == pytest.approx([0.05, 0.005, 0.005])
    assert metrics["best_val_acc"] > 0.25


def test_resume_round_trip_is_exact(tmp_path):
    """Stop after epoch 2 of 3 (by limiting epochs at the same schedule), resume: same weights."""
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    run(full_dir, "trainer.epochs=3", "sched=constant")
    run(part_dir, "trainer.epochs=2", "sched=constant")
    _, resumed = run(part_dir, "trainer.epochs=3", "sched=constant", "trainer.resume=true")
    a = torch.load(full_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    full = json.loads((full_dir / "metrics.json").read_text())
    assert resumed["final_val_acc"] == pytest.approx(full["final_val_acc"])
    events = EventAccumulator(str(part_dir / "tb")).Reload()
    steps = sorted(e.step for e in events.Scalars("val/acc"))  # event files of one second: any read order
    assert steps == sorted(set(steps)) and len(steps) == 3  # no duplicated points after resume


def test_ckpt_path_starts_from_another_runs_weights(tmp_path):
    run(tmp_path / "a", "trainer.epochs=1")
    _, metrics = run(tmp_path / "b", "trainer.epochs=2", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")
    assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path, "trainer.resume=true")


def test_checkpoint_from_another_model_is_rejected(tmp_path):
    run(tmp_path / "a", "trainer.epochs=1")
    with pytest.raises(CheckpointError, match="does not match"):
        run(tmp_path / "b", "model.width=32", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")


def trained_models(monkeypatch) -> list:
    """The modules `fit` runs its optimizer steps on, one per run, in order."""
    models, original = [], loop.train_step

    def spy(parts, *args, **kwargs):
        if not models or parts.model is not models[-1]:
            models.append(parts.model)
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    return models


def test_first_and_last_layer_policy_reaches_the_model(tmp_path, monkeypatch):
    models = trained_models(monkeypatch)
    run(tmp_path / "policy", "method=xnor", "trainer.epochs=1", "trainer.limit_train_batches=2")
    ckpt = torch.load(tmp_path / "policy" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["binarized_layers"] == ["features.4"]  # 2 hidden layers: first and last (classifier) real
    trained = models[0]
    assert type(trained.features[1]) is nn.Linear and type(trained.classifier) is nn.Linear
    assert trained.features[4].weight_quantizer is not None and trained.features[4].input_quantizer is not None

    run(tmp_path / "all", "method=xnor", "method.keep_first_real=false", "method.keep_last_real=false",
        "trainer.epochs=1", "trainer.limit_train_batches=2")
    ckpt = torch.load(tmp_path / "all" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["binarized_layers"] == ["features.1", "features.4", "classifier"]
    first, last = models[1].features[1], models[1].classifier
    assert first.weight_quantizer is not None and first.input_quantizer is None  # the input is never binarized
    assert last.weight_quantizer is not None and last.input_quantizer is not None


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="needs ../shared/data MNIST")
def test_mnist_bnn_mlp_reaches_90_percent(tmp_path):
    cfg = compose_cfg("data=mnist", f"data.root={SHARED_DATA}", "data.download=false", "model=mlp",
                      "model.width=512", "method=bnn", "trainer.epochs=1", "trainer.limit_train_batches=300",
                      "trainer.progress=false", "trainer.checkpoint=false")
    metrics = fit(cfg, tmp_path, {})
    assert metrics["final_val_acc"] >= 0.90


def test_cli_sweep_gives_one_named_run_per_job_in_one_hparams_table(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "method=fp,bnn", *FAST, "trainer.epochs=1",
           f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name for p in runs] == [
        "0_data=synthetic,method=fp,model.depth=2,model.width=64,model=mlp,trainer.epochs=1",
        "1_data=synthetic,method=bnn,model.depth=2,model.width=64,model=mlp,trainer.epochs=1"]
    assert {json.loads(p.read_text())["choices"]["method"] for p in runs} == {"fp", "bnn"}
    for run in runs:  # each job's HParams row, read back with TensorBoard's own reader
        events = EventAccumulator(str(run.parent / "tb")).Reload()
        assert b"method" in events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        assert "hparams/best_val_acc" in events.Tags()["scalars"]
        assert [e.step for e in events.Scalars("val/acc")] == [16]  # tags and steps line up across runs


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    _, first = run(tmp_path, "trainer.epochs=1", "trainer.resume=auto")
    assert first["epochs_completed"] == 1
    _, again = run(tmp_path, "trainer.epochs=2", "trainer.resume=auto")  # a requeued job
    assert again["epochs_completed"] == 2 and len(again["history"]) == 2


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                          "trainer.resume=auto"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.trainer.resume == "auto"


def test_sweep_with_a_failing_job_keeps_the_others_and_summarizes(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "method=bnn,reactnet", *FAST, "trainer.epochs=1",
           f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "1 of 2 jobs completed, 1 failed:" in result.stderr
    assert "job 1 (method=reactnet" in result.stderr and "use model=bireal18" in result.stderr
    done = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert [m["choices"]["method"] for m in done] == ["bnn"] and done[0]["status"] == "completed"
    statuses = [json.loads(line)["status"] for line in (sweep / "sweep_status.jsonl").read_text().splitlines()]
    assert statuses == ["completed", "failed"]


def _nan_on_calls(monkeypatch, calls):
    from bnn_train.train import losses

    real, count = losses.LOSSES["cross_entropy"], {"n": 0}

    def cross_entropy(logits, y):
        loss = real(logits, y)
        if torch.is_grad_enabled():  # training calls; evaluation runs under no_grad
            count["n"] += 1
            if count["n"] in calls:
                return loss * float("nan")
        return loss

    monkeypatch.setitem(losses.LOSSES, "cross_entropy", cross_entropy)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from bnn_train.errors import TrainingError

    _nan_on_calls(monkeypatch, {3})
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3; .*skip_nonfinite"):
        run(tmp_path, "trainer.epochs=1", "trainer.ckpt_every_n_steps=1")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                                 if v.is_floating_point())


def test_skip_nonfinite_skips_up_to_n_batches(tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2, 5})
    _, metrics = run(tmp_path, "trainer.epochs=1", "trainer.skip_nonfinite=2")
    assert metrics["steps"] == 16 - 2 and metrics["status"] == "completed"


def _softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def _hand_distillation(student, teacher, y, loss, tau, alpha):
    """The batch mean of the KD loss (Hinton et al. 2015) or of ReActNet's distributional loss,
    written out with math."""
    total = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), y.tolist()):
        if loss == "distribution":  # KL(p_T || p_S) at temperature 1, no labels
            total += sum(q * math.log(q / p) for p, q in zip(_softmax(s_row), _softmax(t_row)))
        else:  # alpha * tau^2 * KL at temperature tau + (1 - alpha) * cross-entropy
            kl = sum(q * math.log(q / p) for p, q in zip(_softmax(s_row, tau), _softmax(t_row, tau)))
            total += alpha * tau ** 2 * kl - (1 - alpha) * math.log(_softmax(s_row)[label])
    return total / len(y)


@pytest.mark.parametrize("loss", ["kd", "distribution"])
def test_distillation_from_a_full_precision_run(tmp_path, monkeypatch, loss):
    """The loss each step minimizes and train/loss reports is the distillation loss between the
    student's logits and those of the teacher loaded from the checkpoint."""
    run(tmp_path / "teacher", "method=fp", "trainer.epochs=2")
    path = tmp_path / "teacher" / "checkpoints" / "best.pt"
    steps, original = [], loop.train_step

    def spy(parts, x, y, *args, **kwargs):
        seen = {}

        def keep(name):
            def hook(module, inputs, out):
                seen[name] = out.detach().clone()
            return hook

        hooks = [parts.model.register_forward_hook(keep("student")),
                 parts.teacher.register_forward_hook(keep("teacher"))]
        try:
            result = original(parts, x, y, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        steps.append((x, y, seen["student"], seen["teacher"], result[0].item()))
        return result

    monkeypatch.setattr(loop, "train_step", spy)
    cfg, student = run(tmp_path / "student", "method=bnn", "trainer.epochs=1", "teacher=checkpoint",
                       f"teacher.path={path}", f"teacher.loss={loss}")
    assert student["status"] == "completed" and student["best_val_acc"] > 0.3

    reference = load_teacher(cfg.teacher, 3, 10, 16, "cpu")  # the checkpoint's network, loaded on its own
    for x, y, student_logits, teacher_logits, got in steps[:2]:
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, reference(x))
        expected = _hand_distillation(student_logits, teacher_logits, y, loss, cfg.teacher.temperature,
                                      cfg.teacher.alpha)
        assert got == pytest.approx(expected, rel=1e-5)
    assert student["history"][0]["train_loss"] == pytest.approx(sum(s[-1] for s in steps) / len(steps), rel=1e-6)


@pytest.mark.parametrize("precision,backward", [("fp32", "fp32"), ("int8", "bf16"), ("bf16", "fp32")])
def test_binary_precision_options_train_to_the_same_place(tmp_path, precision, backward):
    """The forward is exact in every precision, so the first steps match the float path; all learn."""
    _, metrics = run(tmp_path, "method=bnn", "trainer.epochs=2", f"trainer.binary_precision={precision}",
                     f"trainer.binary_backward={backward}")
    assert metrics["best_val_acc"] > 0.5
    first = metrics["history"][0]["train_loss"]
    _, ref = run(tmp_path / "ref", "method=bnn", "trainer.epochs=2", "trainer.binary_precision=fp32",
                 "trainer.binary_backward=fp32")
    assert first == pytest.approx(ref["history"][0]["train_loss"], rel=0.05)


def test_conv_model_trains_channels_last_with_exact_products(tmp_path):
    cfg = compose_cfg("data=synthetic", "data.image_size=8", "model=resnet20", "method=xnor", "trainer.epochs=1",
                      "trainer.progress=false", "trainer.limit_train_batches=3", "trainer.binary_precision=bf16",
                      "trainer.channels_last=true")
    metrics = fit(cfg, tmp_path, {})
    assert metrics["epochs_completed"] == 1 and metrics["history"][0]["train_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bnn", "xnor", "bireal", "bwn", "binaryconnect"])
def test_compile_trains_every_scheme(tmp_path, method):
    _, metrics = run(tmp_path, f"method={method}", "trainer.epochs=1", "trainer.compile=true")
    assert metrics["best_val_acc"] > 0.3


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("overrides", [("method=bnn",), ("method=xnor", "method.reg=l2", "trainer.precision=bf16")])
def test_steps_between_log_points_read_nothing_back_from_the_device(tmp_path, monkeypatch, overrides):
    """Every way Python reads a tensor's value (and waits for the device to get there), counted
    from the start of one train_step to the start of the next: none, except after a log step."""
    events, original = [], loop.train_step

    def step(*args, **kwargs):
        events.append("step")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    for name in HOST_READS:
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            events.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    run(tmp_path, *overrides, "trainer.epochs=1", "trainer.limit_train_batches=6", "trainer.log_every_n_steps=3",
        "trainer.limit_val_batches=1")
    starts = [i for i, e in enumerate(events) if e == "step"]
    after = [events[a + 1:b] for a, b in zip(starts, starts[1:])]  # after[k]: step k + 1 and what follows it
    assert len(after) == 5
    assert after[0] == after[1] == after[3] == after[4] == []
    assert after[2] and set(after[2]) <= {"tolist"}  # the log point after step 3: batched reads


def test_train_step_alone_makes_no_host_read(monkeypatch):
    cfg = compose_cfg(*FAST, "method=bnn")
    torch.manual_seed(0)
    net, _ = build_network(cfg, 3, 10, 16)
    parts = StepParts(model=net, optimizer=build_optimizer(net, cfg.optim, binary_weights(net)), clip=1.0)
    tally = Tally(torch.device("cpu"))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    reads = []
    for name in HOST_READS:
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    loss, updated = train_step(parts, x, y, tally, step=1)
    monkeypatch.undo()
    assert reads == [] and updated
    sums = tally.read()
    assert sums["loss"] == pytest.approx(loss.item() * 8) and sums["win_loss"] == sums["loss"]
    assert 0 <= sums["correct"] <= 8 and sums["bad_step"] == 0
