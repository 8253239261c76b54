"""The training loop: build -> (resume) -> for each epoch: train steps, validate, log, checkpoint
-> metrics.json. `fit` reads top to bottom; one optimizer step is `step.train_step`."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bnn_train.analysis import FlipTracker, summarize
from bnn_train.binarize import set_epoch_
from bnn_train.binarize.transform import set_binary_precision
from bnn_train.config import flatten
from bnn_train.data import build_data
from bnn_train.errors import CheckpointError, ConfigError, TrainingError
from bnn_train.train import distributed
from bnn_train.train.checkpoint import load_checkpoint, restore_checkpoint, rng_state, save_checkpoint
from bnn_train.train.cpu_memory import keep_freed_memory
from bnn_train.train.distill import build_teacher
from bnn_train.train.losses import LOSSES, quantization_errors, quantization_penalty
from bnn_train.train.optim import build_optimizer, build_scheduler
from bnn_train.train.records import NullWriter, log_hparams, log_latent_histograms, write_json_atomic
from bnn_train.train.setup import binary_weights, build_network, resolve_device
from bnn_train.train.step import StepParts, Tally, evaluate, train_step

log = logging.getLogger(__name__)


def fit(cfg, run_dir: Path, choices: dict | None = None, stage: dict | None = None,
        init_from: Path | None = None) -> dict:
    """Train the configured network; write tb/, checkpoints/ and metrics.json into `run_dir`.

    stage: how a pretraining stage departs from the method (`stages.py`); init_from: a checkpoint
    whose weights initialize the model (the previous stage), before any resume."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    world = distributed.world_from_env()  # torchrun: one process per device, rank 0 writes
    device = distributed.init(world, resolve_device(cfg.device), cfg.data.batch_size)
    tc = cfg.trainer

    run = build(cfg, run_dir, world, device, stage, init_from)
    progress = resume(cfg, run_dir, run)
    parts = step_parts(cfg, run)
    records = Records(cfg, run_dir, run, progress, choices, stage)

    records.write_metrics("running")
    with logging_redirect_tqdm():
        for epoch in range(progress["epoch"], tc.epochs):
            part, epoch_time = train_epoch(run, parts, records, progress, epoch)
            sum_loss, sum_correct, seen = distributed.all_sum([part["loss"], part["correct"], part["seen"]],
                                                              world, device)
            val_loss, val_acc = evaluate(parts.model, run.data.val, tc.limit_val_batches, parts.autocast,
                                         parts.layout, parts.loss_fn)
            progress["epoch"] = epoch + 1
            progress["train_time_s"] += epoch_time
            progress["train_samples"] += seen
            progress["history"].append({"epoch": epoch + 1, "step": progress["step"],
                                        "train_loss": sum_loss / max(seen, 1),
                                        "train_acc": sum_correct / max(seen, 1),
                                        "val_loss": val_loss, "val_acc": val_acc,
                                        "lr": run.optimizer.param_groups[0]["lr"], "time_s": epoch_time})
            records.log_epoch(progress["history"][-1], seen)
            if val_acc > progress["best_val_acc"] or epoch == 0:
                progress["best_val_acc"] = max(val_acc, progress["best_val_acc"])
                records.checkpoint("best.pt")
            records.checkpoint("last.pt")
            records.write_metrics("running")

    metrics = records.write_metrics("completed")
    records.close(metrics)
    distributed.shutdown(world)
    torch.use_deterministic_algorithms(was_deterministic)
    log.info("best val acc %.4f, final %.4f, %d epochs in %.1f s -> %s", metrics["best_val_acc"],
             metrics["final_val_acc"] or 0.0, metrics["epochs_completed"], metrics["train_time_s"], run_dir)
    return metrics


# ---- build ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """What `build` makes of a config: the data, the network and its optimizer."""

    cfg: object
    world: distributed.Dist
    device: torch.device
    data: object
    net: nn.Module  # the network as checkpoints save it (no DDP / compile wrapper)
    binarized: list[str]
    teacher: nn.Module | None
    loss_fn: object
    summary: object
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object


def build(cfg, run_dir: Path, world: distributed.Dist, device: torch.device, stage: dict | None = None,
          init_from: Path | None = None) -> Run:
    """Data, binarized network (initialized from `init_from`), optimizer and schedule; writes
    model_summary.md."""
    tc = cfg.trainer
    data = build_data(cfg.data, device=device, seed=cfg.seed)
    if world.enabled:
        data.train.shard(world.rank, world.world)
    teacher = build_teacher(cfg.teacher, data.in_channels, data.num_classes, data.image_size, device)  # or None
    loss_fn = LOSSES[cfg.get("loss", "cross_entropy")]
    if teacher is not None and loss_fn is not LOSSES["cross_entropy"]:
        raise ConfigError(f"loss={cfg.loss} with teacher={cfg.teacher.name}: distillation's hard-target term is "
                          f"cross-entropy; use loss=cross_entropy or teacher=none")
    net, binarized = build_network(cfg, data.in_channels, data.num_classes, data.image_size, stage)
    if init_from is not None:
        _initialize(net, init_from)
    net.to(device)
    if tc.channels_last:
        net.to(memory_format=torch.channels_last)
    products = set_binary_precision(net, tc.binary_precision, tc.binary_backward, device)
    if device.type == "cpu" and tc.keep_cpu_memory:
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    summary = summarize(net, (data.in_channels, data.image_size, data.image_size))
    if world.is_main:
        (run_dir / "model_summary.md").write_text(summary.to_markdown() + "\n")
    t = summary.totals
    log.info("%s / %s on %s: %d binarized layers, %d binary + %d real parameters; %.3g BOPs + %.3g FLOPs = "
             "%.3g OPs; %.2f MB packed vs %.2f MB fp32 (model_summary.md)", cfg.model.name, cfg.method.name,
             device, len(binarized), t["binary_params"], t["real_params"], t["bops"], t["flops"], t["ops"],
             t["size_packed_mb"], t["size_fp32_mb"])
    if products and (tc.binary_precision, tc.binary_backward) == ("fp32", "fp32"):
        log.info("+-1 products: the float simulation (binary_precision=fp32, binary_backward=fp32)")
    elif products:
        log.info("exact +-1 products: %s (backward %s)", _count(products.values()), tc.binary_backward)
    steps_per_epoch = _limit(len(data.train), tc.limit_train_batches)
    optimizer = build_optimizer(net, cfg.optim, binary_weights(net))
    scheduler = build_scheduler(optimizer, cfg.sched, steps_per_epoch, tc.epochs)
    return Run(cfg, world, device, data, net, binarized, teacher, loss_fn, summary, steps_per_epoch, optimizer,
               scheduler)


def resume(cfg, run_dir: Path, run: Run) -> dict:
    """The run's progress: fresh, or restored with weights, optimizer, schedule and RNG from a checkpoint."""
    ckpt_file = _resume_file(cfg, run_dir)
    if ckpt_file is None:
        return {"epoch": 0, "step": 0, "best_val_acc": 0.0, "history": [], "train_time_s": 0.0,
                "train_samples": 0, "skipped_nonfinite": 0, "partial": None}
    progress = restore_checkpoint(ckpt_file, cfg, run.net, run.optimizer, run.scheduler)
    log.info("resumed from %s at epoch %d (step %d)", ckpt_file, progress["epoch"], progress["step"])
    return progress


def step_parts(cfg, run: Run) -> StepParts:
    """The module that trains (DDP and torch.compile around `run.net`) and what each step applies."""
    tc = cfg.trainer
    model = distributed.wrap(run.net, run.world, run.device)
    if tc.compile:
        model = torch.compile(model)
    reg, weight = cfg.method.get("reg", "none"), cfg.method.get("reg_weight")
    penalty = None if reg == "none" else (lambda: weight * quantization_penalty(run.net, reg))
    return StepParts(
        model=model, optimizer=run.optimizer, scheduler=run.scheduler, loss_fn=run.loss_fn,
        teacher=run.teacher, distill=cfg.teacher, penalty=penalty, clip=cfg.method.clip_latent,
        autocast=torch.autocast(run.device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext(),
        layout=torch.channels_last if tc.channels_last else torch.contiguous_format,
        check_finite=tc.skip_nonfinite > 0)


# ---- one epoch -----------------------------------------------------------------------------------


def train_epoch(run: Run, parts: StepParts, records: Records, progress: dict, epoch: int) -> tuple[dict, float]:
    """The optimizer steps of epoch `epoch`, from where a mid-epoch checkpoint left it, with their
    log points and mid-epoch checkpoints; returns the epoch's sums and its seconds."""
    tc = run.cfg.trainer
    # Running sums of this epoch; a mid-epoch checkpoint carries them, so a resumed epoch
    # continues its order, its averages and its log windows where they stopped.
    part = progress["partial"] or {"batch": 0, "loss": 0.0, "correct": 0, "seen": 0, "time_s": 0.0,
                                   "win_loss": 0.0, "win_correct": 0, "win_seen": 0}
    tally = Tally(run.device, part["loss"], part["correct"], part["win_loss"], part["win_correct"])
    run.data.train.set_epoch(epoch, start_batch=part["batch"])
    set_epoch_(run.net, epoch, tc.epochs)  # schedules that follow the epoch (IR-Net's EDE)
    parts.model.train()
    t0 = time.perf_counter() - part["time_s"]
    show_bar = run.world.is_main and (tc.progress is True or tc.progress == "true"
                                      or (tc.progress == "auto" and sys.stderr.isatty()))
    bar = tqdm(total=run.steps_per_epoch, initial=part["batch"], desc=f"epoch {epoch + 1}/{tc.epochs}",
               disable=not show_bar, leave=False, dynamic_ncols=True)
    for x, y in run.data.train:
        if part["batch"] >= run.steps_per_epoch:
            break
        part["batch"] += 1
        step = progress["step"] + 1
        loss, updated = train_step(parts, x, y, tally, step)
        if not updated:  # only with trainer.skip_nonfinite > 0, which reads every loss
            _nonfinite(loss.item(), step, progress, tc.skip_nonfinite)
            continue
        progress["step"] = step
        part["seen"] += y.numel()
        part["win_seen"] += y.numel()
        log_now = step % tc.log_every_n_steps == 0
        save_now = bool(tc.ckpt_every_n_steps) and step % tc.ckpt_every_n_steps == 0
        if log_now or save_now:
            _read(tally, part, progress, tc.skip_nonfinite)
            bar.set_postfix(loss=f"{part['loss'] / part['seen']:.3f}", acc=f"{part['correct'] / part['seen']:.3f}",
                            samples_s=f"{part['seen'] / (time.perf_counter() - t0):.0f}")
        if log_now:
            records.log_window(part, step)
            part.update(win_loss=0.0, win_correct=0, win_seen=0)
            tally.reset_window()
        if save_now:
            part["time_s"] = time.perf_counter() - t0
            progress["partial"] = part
            records.checkpoint("last.pt")
        bar.update()
    bar.close()
    _read(tally, part, progress, tc.skip_nonfinite)
    progress["partial"] = None
    return part, time.perf_counter() - t0


def _read(tally: Tally, part: dict, progress: dict, allowed: int) -> None:
    """The device's sums into `part`: the one host sync, at log points, checkpoints and epoch ends.

    Without trainer.skip_nonfinite no step reads its loss, so a non-finite one is found here, at
    the step it happened. Its update was applied (checking before it would cost a sync per step),
    but the run stops before any log point or checkpoint sees the result, so the last checkpoint
    is the last good one."""
    sums = tally.read()
    if sums["bad_step"]:
        _nonfinite(sums["bad_loss"], sums["bad_step"], progress, allowed)
    part.update(loss=sums["loss"], correct=sums["correct"], win_loss=sums["win_loss"],
                win_correct=sums["win_correct"])


# ---- what a run writes ---------------------------------------------------------------------------


class Records:
    """TensorBoard (rank 0), checkpoints/ and metrics.json of a run."""

    def __init__(self, cfg, run_dir: Path, run: Run, progress: dict, choices: dict | None, stage: dict | None):
        self.cfg, self.run_dir, self.run, self.progress, self.stage = cfg, run_dir, run, progress, stage
        self.choices = choices or {}
        self.hparams = {**self.choices, **flatten(cfg)}
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.main = run.world.is_main
        # On resume, drop points logged after the checkpoint so curves don't double back.
        self.writer = (SummaryWriter(str(run_dir / "tb"), purge_step=progress["step"] + 1 if progress["step"] else None)
                       if self.main else NullWriter())
        self.writer.add_text("model/summary", run.summary.to_markdown(), progress["step"])
        self.flips = FlipTracker(run.net)  # sign changes of binary weights between log points

    def log_window(self, part: dict, step: int) -> None:
        """train/ scalars of the steps since the previous log point, lr, flips and quantization errors."""
        w = self.writer
        w.add_scalar("train/loss", part["win_loss"] / part["win_seen"], step)
        w.add_scalar("train/acc", part["win_correct"] / part["win_seen"], step)
        w.add_scalar("lr", self.run.optimizer.param_groups[0]["lr"], step)
        for tag, ratio in self.flips.update().items():
            w.add_scalar(tag, ratio, step)
        self._quantization_errors(step)

    def log_epoch(self, entry: dict, seen: int) -> None:
        tc, step, epoch = self.cfg.trainer, entry["step"], entry["epoch"]
        self.writer.add_scalar("val/loss", entry["val_loss"], step)
        self.writer.add_scalar("val/acc", entry["val_acc"], step)
        self.writer.add_scalar("epoch", epoch, step)
        self._quantization_errors(step)  # also when an epoch is shorter than the log interval
        if epoch % tc.hist_every_n_epochs == 0 or epoch == tc.epochs:
            log_latent_histograms(self.writer, self.run.net, step)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1f s, %.0f samples/s)",
                 epoch, tc.epochs, entry["train_loss"], entry["train_acc"], entry["val_loss"], entry["val_acc"],
                 entry["time_s"], seen / max(entry["time_s"], 1e-9))

    def _quantization_errors(self, step: int) -> None:
        errors = quantization_errors(self.run.net)
        if errors:
            for name, eps in zip(errors, torch.stack(list(errors.values())).tolist()):  # one read for all layers
                self.writer.add_scalar(f"quant_error/{name}", eps, step)

    def checkpoint(self, name: str) -> None:
        if self.cfg.trainer.checkpoint and self.main:
            self.writer.flush()  # every point up to this step is on disk before the checkpoint says so
            run = self.run
            save_checkpoint(self.run_dir / "checkpoints" / name, {
                "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "progress": self.progress, "rng": rng_state(),
                "binarized_layers": run.binarized, "config": self.config, "stage": self.stage,
                "input_shape": [run.data.in_channels, run.data.image_size, run.data.num_classes]})

    def write_metrics(self, status: str) -> dict:
        progress = self.progress
        history = progress["history"]
        metrics = {
            "status": status,
            "best_val_acc": progress["best_val_acc"],
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs_completed": progress["epoch"],
            "steps": progress["step"],
            "train_time_s": progress["train_time_s"],
            "train_samples_per_s": progress["train_samples"] / max(progress["train_time_s"], 1e-9),
            "model_summary": self.run.summary.totals,
            "history": history, "choices": self.choices, "config": self.hparams,
        }
        if self.main:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
        return metrics

    def close(self, metrics: dict) -> None:
        log_hparams(self.writer, self.hparams, {"best_val_acc": metrics["best_val_acc"],
                                                "final_val_acc": metrics["final_val_acc"] or 0.0,
                                                "train_time_s": metrics["train_time_s"]})
        self.writer.close()


# ---- helpers -------------------------------------------------------------------------------------


def _count(values) -> str:
    return ", ".join(f"{n} layers {p}" for p, n in sorted(Counter(values).items()))


def _nonfinite(value: float, step: int, progress: dict, allowed: int) -> None:
    """Skip the batch of `step` while fewer than `allowed` have been skipped, else stop the run."""
    if progress["skipped_nonfinite"] >= allowed:
        raise TrainingError(f"non-finite loss ({value}) at step {step}; lower optim.lr or check the data, or "
                            f"set trainer.skip_nonfinite=N to skip such batches (last good checkpoint kept)")
    progress["skipped_nonfinite"] += 1
    log.warning("non-finite loss (%s) at step %d: batch skipped (%d of %d allowed)", value, step,
                progress["skipped_nonfinite"], allowed)


def _limit(n_batches: int, limit: int | None) -> int:
    return n_batches if limit is None else min(n_batches, limit)


def _resume_file(cfg, run_dir: Path) -> Path | None:
    """checkpoints/last.pt of this run dir when trainer.resume, else ckpt_path, else None.

    resume=auto continues when last.pt exists and starts fresh otherwise: a requeued cluster job
    runs the same command again and picks up where it stopped."""
    resume = str(cfg.trainer.resume).lower()
    if resume in ("true", "auto"):
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            return last
        if resume == "true" and cfg.ckpt_path is None:
            raise CheckpointError(f"trainer.resume=true but {last} does not exist; point hydra.run.dir at the "
                                  f"run to resume (or pass ckpt_path=PATH)")
    return Path(cfg.ckpt_path) if cfg.ckpt_path is not None else None


def _initialize(net, path: Path) -> None:
    """Weights of a previous stage; parameters that only this stage has (e.g. ReActNet's learnable
    thresholds) keep their initialization."""
    state = load_checkpoint(path)
    try:
        result = net.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: does not fit this model ({str(e).strip().splitlines()[-1].strip()}); "
                              f"initialize from a stage of the same model and data") from None
    if result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path}: has weights this model lacks ({result.unexpected_keys[0]}, ...); "
                              f"initialize from a stage of the same model")
    log.info("initialized from %s%s", path, f" (new: {', '.join(result.missing_keys)})" if result.missing_keys else "")
