"""A run killed with SIGKILL at a random step and resumed ends exactly where an uninterrupted run
ends: same weights, same metrics, no duplicated TensorBoard points."""

import json
import random
import signal
import subprocess
import sys
import time

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO

RECIPE = ["data=synthetic", "data.batch_size=8", "model=mlp", "model.width=64", "model.depth=2", "method=bnn",
          "trainer.epochs=3", "trainer.ckpt_every_n_steps=1", "trainer.deterministic=true",
          "trainer.progress=false", "trainer.log_every_n_steps=10"]
STEPS = 3 * 1024 // 8


def train(run_dir, *extra):
    return subprocess.Popen([sys.executable, "train.py", *RECIPE, f"hydra.run.dir={run_dir}", *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def saved_step(run_dir):
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]
    except Exception:  # not written yet
        return -1


def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path):
    reference = train(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]

    kill_after = random.Random().randint(20, STEPS - 60)
    victim = train(tmp_path / "run")
    deadline = time.time() + 240
    while saved_step(tmp_path / "run") < kill_after and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = saved_step(tmp_path / "run")
    assert 0 < killed_at < STEPS

    resumed = train(tmp_path / "run", "trainer.resume=true")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]

    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), (key, killed_at)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run"))
    for ea, eb in zip(ma["history"], mb["history"], strict=True):
        for k in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ea[k] == eb[k], (k, killed_at)
    assert (ma["best_val_acc"], ma["final_val_acc"]) == (mb["best_val_acc"], mb["final_val_acc"])

    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(10, STEPS + 1, 10))  # each point once, none lost
    ref_events = EventAccumulator(str(tmp_path / "ref" / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [e.value for e in ref_events.Scalars("train/loss")]
