"""The training loop: build -> (resume) -> for each epoch: train, clip latent weights, validate,
log, checkpoint -> metrics.json. Reads top to bottom."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bnn_train.analysis import FlipTracker, summarize
from bnn_train.binarize import clip_latent_, set_epoch_
from bnn_train.binarize.transform import set_binary_precision
from bnn_train.config import flatten
from bnn_train.data import build_data
from bnn_train.errors import CheckpointError, ConfigError, TrainingError
from bnn_train.train import distributed
from bnn_train.train.cpu_memory import keep_freed_memory
from bnn_train.train.checkpoint import load_checkpoint, restore_checkpoint, rng_state, save_checkpoint
from bnn_train.train.distill import build_teacher, distillation_loss
from bnn_train.train.losses import LOSSES, quantization_errors, quantization_penalty
from bnn_train.train.optim import build_optimizer, build_scheduler
from bnn_train.train.records import NullWriter, log_hparams, log_latent_histograms, write_json_atomic
from bnn_train.train.setup import binary_weights, build_network, resolve_device

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
    main = world.is_main
    tc = cfg.trainer

    # ---- build: data, binarized model, optimizer, schedule --------------------------------
    data = build_data(cfg.data, device=device, seed=cfg.seed)
    if world.enabled:
        data.train.shard(world.rank, world.world)
    teacher = build_teacher(cfg.teacher, data.in_channels, data.num_classes, data.image_size, device)  # or None
    loss_fn = LOSSES[cfg.get("loss", "cross_entropy")]
    if teacher is not None and loss_fn is not LOSSES["cross_entropy"]:
        raise ConfigError(f"loss={cfg.loss} with teacher={cfg.teacher.name}: distillation's hard-target term is "
                          f"cross-entropy; use loss=cross_entropy or teacher=none")
    reg = cfg.method.get("reg", "none")
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
    if main:
        (run_dir / "model_summary.md").write_text(summary.to_markdown() + "\n")
    t = summary.totals
    log.info("%s / %s on %s: %d binarized layers, %d binary + %d real parameters; %.3g BOPs + %.3g FLOPs = "
             "%.3g OPs; %.2f MB packed vs %.2f MB fp32 (model_summary.md)", cfg.model.name, cfg.method.name,
             device, len(binarized), t["binary_params"], t["real_params"], t["bops"], t["flops"], t["ops"],
             t["size_packed_mb"], t["size_fp32_mb"])
    steps_per_epoch = _limit(len(data.train), tc.limit_train_batches)
    optimizer = build_optimizer(net, cfg.optim, binary_weights(net))
    scheduler = build_scheduler(optimizer, cfg.sched, steps_per_epoch, tc.epochs)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                else nullcontext())

    # ---- resume ------------------------------------------------------------------------
    progress = {"epoch": 0, "step": 0, "best_val_acc": 0.0, "history": [], "train_time_s": 0.0,
                "train_samples": 0, "skipped_nonfinite": 0, "partial": None}
    ckpt_file = _resume_file(cfg, run_dir)
    if ckpt_file is not None:
        progress = restore_checkpoint(ckpt_file, cfg, net, optimizer, scheduler)
        log.info("resumed from %s at epoch %d (step %d)", ckpt_file, progress["epoch"], progress["step"])

    hparams = {**{k: v for k, v in (choices or {}).items()}, **flatten(cfg)}
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    # On resume, drop points logged after the checkpoint so curves don't double back.
    writer = (SummaryWriter(str(run_dir / "tb"), purge_step=progress["step"] + 1 if progress["step"] else None)
              if main else NullWriter())
    if products and (tc.binary_precision, tc.binary_backward) == ("fp32", "fp32"):
        log.info("+-1 products: the float simulation (binary_precision=fp32, binary_backward=fp32)")
    elif products:
        log.info("exact +-1 products: %s (backward %s)", _count(products.values()), tc.binary_backward)
    model = distributed.wrap(net, world, device)  # the module the loop trains; `net` is what is saved
    if tc.compile:
        model = torch.compile(model)
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    writer.add_text("model/summary", summary.to_markdown(), progress["step"])
    flips = FlipTracker(net)  # sign changes of binary weights between log points
    show_bar = main and (tc.progress is True or tc.progress == "true" or (tc.progress == "auto" and sys.stderr.isatty()))

    def checkpoint(name: str) -> None:
        if tc.checkpoint and main:
            writer.flush()  # every point up to this step is on disk before the checkpoint says so
            save_checkpoint(run_dir / "checkpoints" / name, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": progress, "rng": rng_state(),
                "binarized_layers": binarized, "config": config_dict, "stage": stage,
                "input_shape": [data.in_channels, data.image_size, data.num_classes]})

    def write_metrics(status: str) -> dict:
        history = progress["history"]
        metrics = {
            "status": status,
            "best_val_acc": progress["best_val_acc"],
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs_completed": progress["epoch"],
            "steps": progress["step"],
            "train_time_s": progress["train_time_s"],
            "train_samples_per_s": progress["train_samples"] / max(progress["train_time_s"], 1e-9),
            "model_summary": summary.totals,
            "history": history, "choices": choices or {}, "config": hparams,
        }
        if main:
            write_json_atomic(run_dir / "metrics.json", metrics)
        return metrics

    # ---- epochs --------------------------------------------------------------------------
    metrics = write_metrics("running")
    with logging_redirect_tqdm():
        for epoch in range(progress["epoch"], tc.epochs):
            # Running sums of this epoch; a mid-epoch checkpoint carries them, so a resumed epoch
            # continues its order, its averages and its log windows where they stopped.
            part = progress["partial"] or {"batch": 0, "loss": 0.0, "correct": 0, "seen": 0, "time_s": 0.0,
                                           "win_loss": 0.0, "win_correct": 0, "win_seen": 0}
            data.train.set_epoch(epoch, start_batch=part["batch"])
            set_epoch_(net, epoch, tc.epochs)  # schedules that follow the epoch (IR-Net's EDE)
            model.train()
            t0 = time.perf_counter() - part["time_s"]
            bar = tqdm(total=steps_per_epoch, initial=part["batch"], desc=f"epoch {epoch + 1}/{tc.epochs}",
                       disable=not show_bar, leave=False, dynamic_ncols=True)
            for x, y in data.train:
                if part["batch"] >= steps_per_epoch:
                    break
                part["batch"] += 1
                x = _layout(x, layout)
                with autocast:
                    logits = model(x)
                    if teacher is None:
                        loss = loss_fn(logits.float(), y)
                    else:  # distillation from the frozen teacher; train/loss logs this loss
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        loss = distillation_loss(logits.float(), teacher_logits.float(), y, cfg.teacher)
                    if reg != "none":
                        loss = loss + cfg.method.reg_weight * quantization_penalty(net, reg)
                if not math.isfinite(loss.item()):
                    _nonfinite(loss.item(), progress, tc.skip_nonfinite)
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                clip_latent_(model, cfg.method.clip_latent)  # latent weights back into [-c, c]
                scheduler.step()
                progress["step"] += 1

                n, correct = y.numel(), (logits.argmax(1) == y).sum().item()
                for prefix in ("", "win_"):
                    part[prefix + "loss"] += loss.item() * n
                    part[prefix + "correct"] += correct
                    part[prefix + "seen"] += n
                if progress["step"] % tc.log_every_n_steps == 0:
                    writer.add_scalar("train/loss", part["win_loss"] / part["win_seen"], progress["step"])
                    writer.add_scalar("train/acc", part["win_correct"] / part["win_seen"], progress["step"])
                    writer.add_scalar("lr", optimizer.param_groups[0]["lr"], progress["step"])
                    for tag, ratio in flips.update().items():
                        writer.add_scalar(tag, ratio, progress["step"])
                    for name, eps in quantization_errors(net).items():
                        writer.add_scalar(f"quant_error/{name}", eps.item(), progress["step"])
                    part.update(win_loss=0.0, win_correct=0, win_seen=0)
                if tc.ckpt_every_n_steps and progress["step"] % tc.ckpt_every_n_steps == 0:
                    part["time_s"] = time.perf_counter() - t0
                    progress["partial"] = part
                    checkpoint("last.pt")
                bar.set_postfix(loss=f"{part['loss'] / part['seen']:.3f}", acc=f"{part['correct'] / part['seen']:.3f}",
                                samples_s=f"{part['seen'] / (time.perf_counter() - t0):.0f}")
                bar.update()
            bar.close()
            epoch_time = time.perf_counter() - t0
            progress["partial"] = None
            sum_loss, sum_correct, seen = distributed.all_sum([part["loss"], part["correct"], part["seen"]],
                                                              world, device)

            val_loss, val_acc = evaluate(model, data.val, tc.limit_val_batches, autocast, layout, loss_fn)
            progress["epoch"] = epoch + 1
            progress["train_time_s"] += epoch_time
            progress["train_samples"] += seen
            progress["history"].append({"epoch": epoch + 1, "step": progress["step"],
                                        "train_loss": sum_loss / max(seen, 1),
                                        "train_acc": sum_correct / max(seen, 1),
                                        "val_loss": val_loss, "val_acc": val_acc,
                                        "lr": optimizer.param_groups[0]["lr"], "time_s": epoch_time})
            step = progress["step"]
            writer.add_scalar("val/loss", val_loss, step)
            writer.add_scalar("val/acc", val_acc, step)
            writer.add_scalar("epoch", epoch + 1, step)
            for name, eps in quantization_errors(net).items():  # also when an epoch is shorter than the log interval
                writer.add_scalar(f"quant_error/{name}", eps.item(), step)
            if (epoch + 1) % tc.hist_every_n_epochs == 0 or epoch + 1 == tc.epochs:
                log_latent_histograms(writer, net, step)
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1f s, %.0f samples/s)",
                     epoch + 1, tc.epochs, sum_loss / max(seen, 1), sum_correct / max(seen, 1), val_loss,
                     val_acc, epoch_time, seen / max(epoch_time, 1e-9))

            if val_acc > progress["best_val_acc"] or epoch == 0:
                progress["best_val_acc"] = max(val_acc, progress["best_val_acc"])
                checkpoint("best.pt")
            checkpoint("last.pt")
            metrics = write_metrics("running")

    metrics = write_metrics("completed")
    log_hparams(writer, hparams, {"best_val_acc": metrics["best_val_acc"],
                                  "final_val_acc": metrics["final_val_acc"] or 0.0,
                                  "train_time_s": metrics["train_time_s"]})
    writer.close()
    distributed.shutdown(world)
    torch.use_deterministic_algorithms(was_deterministic)
    log.info("best val acc %.4f, final %.4f, %d epochs in %.1f s -> %s", metrics["best_val_acc"],
             metrics["final_val_acc"] or 0.0, metrics["epochs_completed"], metrics["train_time_s"], run_dir)
    return metrics


@torch.no_grad()
def evaluate(model, loader, limit: int | None, autocast, layout=torch.contiguous_format,
             loss_fn=LOSSES["cross_entropy"]) -> tuple[float, float]:
    """(mean loss, accuracy) over the first `limit` batches of `loader` (all when None)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        with autocast:
            logits = model(_layout(x, layout)).float()
        total_loss += loss_fn(logits, y).item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _layout(x, layout):
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x


def _count(values) -> str:
    return ", ".join(f"{n} layers {p}" for p, n in sorted(Counter(values).items()))


def _nonfinite(value: float, progress: dict, allowed: int) -> None:
    """Skip the batch while fewer than `allowed` have been skipped, else stop the run."""
    step = progress["step"] + 1
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
