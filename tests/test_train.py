"""End-to-end runs: learning, what a run writes, the clip invariant in checkpoints, resume."""

import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnn_train.binarize import get_scheme
from bnn_train.errors import CheckpointError
from bnn_train.train.loop import fit
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
    steps = [e.step for e in events.Scalars("val/acc")]
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


def test_first_and_last_layer_policy_reaches_the_model(tmp_path):
    run(tmp_path, "method=xnor", "trainer.epochs=1")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["binarized_layers"] == ["features.4"]  # 2 hidden layers: first and last (classifier) real
    assert get_scheme("xnor").binary_activations


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


@pytest.mark.parametrize("loss", ["kd", "distribution"])
def test_distillation_from_a_full_precision_run(tmp_path, loss):
    run(tmp_path / "teacher", "method=fp", "trainer.epochs=2")
    teacher = tmp_path / "teacher" / "checkpoints" / "best.pt"
    _, plain = run(tmp_path / "plain", "method=bnn", "trainer.epochs=1")
    _, student = run(tmp_path / "student", "method=bnn", "trainer.epochs=1", "teacher=checkpoint",
                     f"teacher.path={teacher}", f"teacher.loss={loss}")
    assert student["status"] == "completed" and student["best_val_acc"] > 0.3
    assert student["history"][0]["train_loss"] != plain["history"][0]["train_loss"]  # the loss is the KD loss


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
