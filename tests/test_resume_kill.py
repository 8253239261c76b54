"""A run killed with SIGKILL mid-epoch and resumed ends exactly where an uninterrupted run ends:
same weights, same metrics, no duplicated or lost TensorBoard points."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnn_train.train.loop import fit
from conftest import REPO, compose_cfg

RECIPE = ["data=synthetic", "data.batch_size=8", "model=mlp", "model.width=64", "model.depth=2", "method=bnn",
          "trainer.ckpt_every_n_steps=1", "trainer.deterministic=true", "trainer.progress=false"]
SLOW = ["trainer.epochs=3", "trainer.log_every_n_steps=10"]
SLOW_STEPS = 3 * 1024 // 8
# Two epochs of 4 steps, a log point every 3: the kill after step 5 leaves epoch 2 and a log window half done.
FAST = ["trainer.epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=3"]
FAST_STEPS, FAST_KILL_AFTER = 8, 5

# Runs train.py with loop.train_step wrapped to SIGKILL the process as step N + 1 begins, when the
# checkpoint of step N is on disk: a kill at a fixed point, without racing the run.
KILL_AT_STEP = """
import os, runpy, signal, sys
from bnn_train.train import loop
after, real = int(sys.argv.pop(1)), loop.train_step
def train_step(*args, **kwargs):
    if args[4] == after + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
loop.train_step = train_step
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def train(run_dir, *extra, kill_after=None):
    command = ([sys.executable, "train.py"] if kill_after is None
               else [sys.executable, "-c", KILL_AT_STEP, str(kill_after)])
    return subprocess.Popen([*command, *RECIPE, f"hydra.run.dir={run_dir}", *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc, timeout=300):
    code = proc.wait(timeout=timeout)
    assert code == 0, proc.stderr.read()[-2000:]


def saved_step(run_dir):
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]
    except Exception:  # not written yet
        return -1


def assert_same_end(ref_dir, run_dir, steps, log_every, note):
    a = torch.load(ref_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), (key, note)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref_dir, run_dir))
    for ea, eb in zip(ma["history"], mb["history"], strict=True):
        for k in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ea[k] == eb[k], (k, note)
    assert (ma["best_val_acc"], ma["final_val_acc"]) == (mb["best_val_acc"], mb["final_val_acc"])
    assert ma["steps"] == mb["steps"] == steps

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    # once each (two event files written in the same second may be read in either order)
    assert sorted(e.step for e in events.Scalars("train/loss")) == list(range(log_every, steps + 1, log_every))
    ref_events = EventAccumulator(str(ref_dir / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [e.value for e in ref_events.Scalars("train/loss")]


@pytest.mark.slow  # not yet reliable in a loaded CI run: see the closing note
def test_sigkill_after_a_fixed_step_then_resume_is_bit_exact(tmp_path):
    """train.py killed after step 5; the uninterrupted run and the resume run in this process
    (`fit`, which train.py calls), which spares two interpreter start-ups."""
    victim = train(tmp_path / "run", *FAST, kill_after=FAST_KILL_AFTER)
    fit(compose_cfg(*RECIPE, *FAST), tmp_path / "ref", {})  # meanwhile
    assert victim.wait(timeout=300) == -signal.SIGKILL, victim.stderr.read()[-2000:]
    assert saved_step(tmp_path / "run") == FAST_KILL_AFTER
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "running"

    fit(compose_cfg(*RECIPE, *FAST, "trainer.resume=true"), tmp_path / "run", {})
    assert_same_end(tmp_path / "ref", tmp_path / "run", FAST_STEPS, 3, FAST_KILL_AFTER)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path):
    """Killed from outside at any moment, a checkpoint write included."""
    reference = train(tmp_path / "ref", *SLOW)
    finished(reference)

    kill_after = random.Random(1234).randint(20, SLOW_STEPS - 60)
    victim = train(tmp_path / "run", *SLOW)
    deadline = time.time() + 240
    while saved_step(tmp_path / "run") < kill_after and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = saved_step(tmp_path / "run")
    assert 0 < killed_at < SLOW_STEPS

    finished(train(tmp_path / "run", *SLOW, "trainer.resume=true"))
    assert_same_end(tmp_path / "ref", tmp_path / "run", SLOW_STEPS, 10, killed_at)
