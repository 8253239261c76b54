"""Bad input stops with one line naming what was wrong and what to do: damaged or foreign
checkpoints, output folders that cannot be written, full disks, and common command-line mistakes
(one `error:` line on stderr, no traceback, non-zero exit)."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIG_DIR, REPO, compose_cfg
from omegaconf import OmegaConf

from bnn_train.cli import preflight, report_user_errors, run_cli
from bnn_train.errors import CheckpointError, ConfigError, TrainingError, UserError
from bnn_train.train import checkpoint, records
from bnn_train.train.checkpoint import (
    describe_mismatch,
    load_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from bnn_train.train.loop import fit
from bnn_train.train.optim import build_optimizer, build_scheduler
from bnn_train.train.records import write_json_atomic
from bnn_train.train.setup import binary_weights, build_network

TINY = ["data=synthetic", "data.train_size=128", "data.val_size=64", "model=mlp", "model.width=16",
        "model.depth=1", "trainer.epochs=1", "trainer.progress=false"]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def run(run_dir, *overrides, monkeypatch=None):
    """fit() with TINY + overrides."""
    return fit(compose_cfg(*TINY, *overrides), run_dir, {})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real checkpoint of a TINY run (mlp width 16, depth 1, bnn, adam, 10 classes)."""
    run_dir = tmp_path_factory.mktemp("source")
    run(run_dir)
    return run_dir / "checkpoints" / "last.pt"


def copy_cut(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# ---------------------------------------------------------------------------------------------
# Checkpoints that cannot be read
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "is truncated or corrupt"),
    ("random", "is not a PyTorch checkpoint"),
    ("text", "is a text file"),
    ("empty", "is empty"),
    ("missing", "no such file"),
    ("folder", "is a folder"),
])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, ckpt, kind, expected):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        copy_cut(ckpt, path)
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path = REPO / "README.md"
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        run(tmp_path / "run", f"ckpt_path={path}")
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ") and expected in message and "\n" not in message
    # The command line finds the same before any data is loaded (a missing file is left to the job:
    # a sweep may name the checkpoint an earlier job writes).
    if kind != "missing":
        with pytest.raises(CheckpointError, match=expected):
            preflight([*TINY, f"ckpt_path={path}"], CONFIG_DIR)
        preflight([*TINY, f"ckpt_path={path}", "trainer.resume=auto"], CONFIG_DIR)  # may resume instead


def test_truncated_zip_that_passes_the_quick_check_still_fails_in_one_line(tmp_path, ckpt, monkeypatch):
    path = copy_cut(ckpt, tmp_path / "cut.pt", 0.5)
    monkeypatch.setattr(checkpoint, "check_checkpoint_file", lambda p: None)  # straight to torch.load
    with pytest.raises(CheckpointError, match=r"cannot be read as a PyTorch checkpoint, truncated or corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": {}, "config": compose_cfg(*TINY)}, path)  # a DictConfig: not weights_only-safe
    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        load_checkpoint(path)


def test_checkpoint_without_what_a_run_needs(tmp_path, ckpt, monkeypatch):
    full = torch.load(ckpt, weights_only=True)
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": full["model"]}, weights_only)
    with pytest.raises(CheckpointError) as info:
        run(tmp_path / "run", f"ckpt_path={weights_only}", monkeypatch=monkeypatch)
    assert str(info.value).startswith(f"checkpoint {weights_only}: lacks 'optimizer', 'scheduler', 'progress'")

    bare = tmp_path / "bare.pt"
    torch.save(full["model"], bare)
    with pytest.raises(CheckpointError, match=r"is a bare state_dict \(\d+ tensors\)"):
        load_checkpoint(bare)

    no_epoch = tmp_path / "no_epoch.pt"
    torch.save({**full, "progress": {k: v for k, v in full["progress"].items() if k != "epoch"}}, no_epoch)
    with pytest.raises(CheckpointError, match="its 'progress' entry lacks 'epoch'"):
        read_checkpoint(no_epoch)

    older = tmp_path / "older.pt"  # written before skipped_nonfinite / partial existed: still resumes
    torch.save({**full, "progress": {k: v for k, v in full["progress"].items()
                                     if k not in ("skipped_nonfinite", "partial")}}, older)
    progress = read_checkpoint(older)["progress"]
    assert progress["partial"] is None and progress["skipped_nonfinite"] == 0


# ---------------------------------------------------------------------------------------------
# Checkpoints written for another model, scheme, data or optimizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, saved, current, detail", [
    ("model.width=32", "model.width=16", "model.width=32", ("features.1.weight is [16, 768] in the checkpoint, "
                                                            "[32, 768] here")),
    ("model.depth=2", "model.depth=1", "model.depth=2", "tensors the checkpoint lacks"),
    ("data.num_classes=5", "data.num_classes=10", "data.num_classes=5", "[10, 16] in the checkpoint, [5, 16] here"),
    ("optim=sgd", "optim=adam", "optim=sgd", "optimizer state is of another type"),
])
def test_checkpoint_of_another_setup_names_what_differs(tmp_path, ckpt, monkeypatch, override, saved, current,
                                                        detail):
    with pytest.raises(CheckpointError) as info:
        run(tmp_path, override, "trainer.epochs=2", f"ckpt_path={ckpt}", monkeypatch=monkeypatch)
    message = str(info.value)
    assert message.startswith(f"checkpoint {ckpt}: does not match this run, written for {saved}, this run has {current} (")
    assert detail in message and f"add {saved} to use it" in message and "\n" not in message


def test_same_setup_restores(tmp_path, ckpt, monkeypatch):
    metrics = run(tmp_path, "trainer.epochs=2", f"ckpt_path={ckpt}", monkeypatch=monkeypatch)
    assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2


def _parts(*overrides):
    cfg = compose_cfg("data=synthetic", "model=bireal18", *overrides)
    net, _ = build_network(cfg, cfg.data.channels, cfg.data.num_classes, cfg.data.image_size)
    optimizer = build_optimizer(net, cfg.optim, binary_weights(net))
    return cfg, net, optimizer, build_scheduler(optimizer, cfg.sched, 10, 1)


def test_reactnet_run_from_a_bireal_checkpoint_names_the_scheme_and_the_extra_tensors(tmp_path):
    cfg, net, optimizer, scheduler = _parts("method=bireal")
    path = tmp_path / "bireal.pt"
    progress = {"epoch": 1, "step": 10, "best_val_acc": 0.1, "history": [], "train_time_s": 1.0, "train_samples": 640}
    save_checkpoint(path, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "progress": progress, "rng": checkpoint.rng_state(),
                           "config": OmegaConf.to_container(cfg, resolve=True)})
    cfg, net, optimizer, scheduler = _parts("method=reactnet")
    with pytest.raises(CheckpointError) as info:
        restore_checkpoint(path, cfg, net, optimizer, scheduler)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: does not match this run, written for method=bireal, "
                              f"this run has method=reactnet (")
    assert "*.threshold x16" in message and "add method=bireal to use it" in message
    cfg, net, optimizer, scheduler = _parts("method=bireal")
    assert restore_checkpoint(path, cfg, net, optimizer, scheduler)["epoch"] == 1


def test_describe_mismatch():
    saved = {"model": {"name": "mlp", "width": 64, "depth": 2, "dropout": 0.0}, "method": {"name": "bnn"},
             "data": {"name": "synthetic", "num_classes": 10, "batch_size": 64}, "optim": {"name": "adam", "lr": 1e-3}}
    assert describe_mismatch(saved, saved) is None
    assert describe_mismatch(None, saved) is None
    other = {**saved, "model": {**saved["model"], "width": 32, "dropout": 0.5},  # dropout shapes nothing
             "data": {**saved["data"], "num_classes": 5, "batch_size": 8}, "optim": {"name": "adam", "lr": 0.1}}
    assert describe_mismatch(saved, other) == ("written for model.width=64 data.num_classes=10, "
                                               "this run has model.width=32 data.num_classes=5")
    assert describe_mismatch(saved, {**saved, "model": {"name": "resnet20"}}) == (
        "written for model=mlp, this run has model=resnet20")


# ---------------------------------------------------------------------------------------------
# Writes that fail: atomic, temp file removed, one line naming the file
# ---------------------------------------------------------------------------------------------


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def half_written_then_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise ENOSPC

    monkeypatch.setattr(checkpoint.torch, "save", half_written_then_full)
    with pytest.raises(TrainingError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert str(info.value) == (f"cannot write {path} (No space left on device): free space, or set hydra.run.dir to "
                               f"a folder on another disk; the previous last.pt is kept")
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_failed_json_write_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"status": "running"})
    monkeypatch.setattr(records.os, "fsync", lambda fd: (_ for _ in ()).throw(ENOSPC))
    with pytest.raises(TrainingError, match=rf"^cannot write {path} \(No space left on device\): free space"):
        write_json_atomic(path, {"status": "completed"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    monkeypatch.setattr(records.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(TrainingError, match="Read-only file system.*make the folder writable"):
        write_json_atomic(tmp_path / "new.json", {})


def test_disk_full_mid_run_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def fails_after_two(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 wrote best.pt and last.pt; epoch 2's first save fails
            raise ENOSPC
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fails_after_two)
    with pytest.raises(TrainingError, match=r"cannot write .*/checkpoints/(best|last)\.pt \(No space left"):
        run(tmp_path, "trainer.epochs=3")
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert not list(tmp_path.rglob("*.tmp"))
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["progress"]["epoch"] == 1
    assert run(tmp_path, "trainer.epochs=2", "trainer.resume=true",
               monkeypatch=monkeypatch)["epochs_completed"] == 2  # the kept checkpoint resumes


# ---------------------------------------------------------------------------------------------
# Output folders Hydra cannot create: caught by the command line before any work
# ---------------------------------------------------------------------------------------------


def test_unwritable_run_dir_is_rejected_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir=/proc/nope: cannot create the output folder under /proc "
                                          r"\(.*\); set hydra\.run\.dir=PATH"):
        preflight([*TINY, "hydra.run.dir=/proc/nope"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=rf"under {tmp_path / 'afile'} \(a file, not a folder\)"):
        preflight([*TINY, f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"^hydra\.sweep\.dir=/proc/sweep: cannot create"):
        preflight(["-m", "seed=0,1", "hydra.sweep.dir=/proc/sweep"], CONFIG_DIR)
    monkeypatch.chdir("/proc")  # the default outputs/... under an unwritable working directory
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir=outputs/.*: cannot create the output folder under /proc"):
        preflight(list(TINY), CONFIG_DIR)
    monkeypatch.chdir(tmp_path)
    preflight([*TINY, f"hydra.run.dir={tmp_path}/new/deeper/${{now:%H}}"], CONFIG_DIR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the write probe leaves nothing


def test_os_errors_outside_the_task_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def hydra_cannot_mkdir():
        raise FileExistsError(errno.EEXIST, "File exists", "/runs/x/.hydra")

    with pytest.raises(SystemExit) as info:
        run_cli(hydra_cannot_mkdir)
    assert info.value.code == UserError.exit_code
    assert capsys.readouterr().err == ("error: cannot use /runs/x/.hydra (File exists): check that path, its "
                                       "permissions and free space, or set hydra.run.dir to a writable folder "
                                       "with a shorter name\n")

    def a_bug():
        raise OSError("no file involved")  # not about a path: a traceback, not a guess

    with pytest.raises(OSError, match="no file involved"):
        run_cli(a_bug)


def test_os_error_inside_the_task_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @report_user_errors
    def task(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/model_summary.md")

    with pytest.raises(SystemExit):
        task(None)
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use /runs/x/model_summary.md (No space left on device)")
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Command-line mistakes: one `error:` line on stderr, no traceback, non-zero exit
# ---------------------------------------------------------------------------------------------


CLI_CASES = {  # name: (arguments, what the error line says); {tmp} is a fresh folder with a file "afile"
    "negative_lr": (["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
    "unknown_model": (["model=nonexistent"], "model=nonexistent: unknown option; choose one of:"),
    "missing_mnist": (["data=mnist", "data.root=/nonexistent", "data.download=false"], "MNIST not found"),
    "text_checkpoint": (["ckpt_path=README.md", *TINY], "checkpoint README.md: is a text file"),
    "proc_run_dir": (["hydra.run.dir=/proc/nope", *TINY], "hydra.run.dir=/proc/nope: cannot create the output folder"),
    "run_dir_under_a_file": (["hydra.run.dir={tmp}/afile/run", *TINY], "{tmp}/afile (a file, not a folder)"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every CLI case at once (they spend their time importing): {name: (CompletedProcess-like, tmp)}."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BNN_DATA_ROOT")}
    running = {}
    for name, (args, _) in CLI_CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        (tmp / "afile").write_text("")
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={tmp / 'run'}")
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[name] = (proc, tmp)
    results = {}
    for name, (proc, tmp) in running.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err, tmp)
    return results


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_error_line(cli_results, name):
    returncode, out, err, tmp = cli_results[name]
    expected = CLI_CASES[name][1].replace("{tmp}", str(tmp))
    lines = [line for line in err.splitlines() if line.strip()]
    assert returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err + out
    assert not (tmp / "run" / "metrics.json").exists()
