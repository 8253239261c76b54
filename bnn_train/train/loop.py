"""The training loop: build -> (resume) -> for each epoch: train, clip latent weights, validate,
log, checkpoint -> metrics.json. Reads top to bottom."""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bnn_train.analysis import FlipTracker, summarize
from bnn_train.binarize import clip_latent_
from bnn_train.config import flatten
from bnn_train.data import build_data
from bnn_train.errors import CheckpointError, TrainingError
from bnn_train.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from bnn_train.train.optim import build_optimizer, build_scheduler
from bnn_train.train.records import log_hparams, log_latent_histograms, write_json_atomic
from bnn_train.train.setup import binary_weights, build_network, resolve_device

log = logging.getLogger(__name__)


def fit(cfg, run_dir: Path, choices: dict | None = None) -> dict:
    """Train the configured network; write tb/, checkpoints/ and metrics.json into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tc = cfg.trainer

    # ---- build: data, binarized model, optimizer, schedule --------------------------------
    data = build_data(cfg.data, device=device, seed=cfg.seed)
    model, binarized = build_network(cfg, data.in_channels, data.num_classes, data.image_size)
    model.to(device)
    summary = summarize(model, (data.in_channels, data.image_size, data.image_size))
    (run_dir / "model_summary.md").write_text(summary.to_markdown() + "\n")
    t = summary.totals
    log.info("%s / %s on %s: %d binarized layers, %d binary + %d real parameters; %.3g BOPs + %.3g FLOPs = "
             "%.3g OPs; %.2f MB packed vs %.2f MB fp32 (model_summary.md)", cfg.model.name, cfg.method.name,
             device, len(binarized), t["binary_params"], t["real_params"], t["bops"], t["flops"], t["ops"],
             t["size_packed_mb"], t["size_fp32_mb"])
    steps_per_epoch = _limit(len(data.train), tc.limit_train_batches)
    optimizer = build_optimizer(model, cfg.optim, binary_weights(model))
    scheduler = build_scheduler(optimizer, cfg.sched, steps_per_epoch, tc.epochs)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                else nullcontext())

    # ---- resume ------------------------------------------------------------------------
    progress = {"epoch": 0, "step": 0, "best_val_acc": 0.0, "history": [], "train_time_s": 0.0,
                "train_samples": 0}
    ckpt_file = _resume_file(cfg, run_dir)
    if ckpt_file is not None:
        progress = _restore(ckpt_file, model, optimizer, scheduler)
        log.info("resumed from %s at epoch %d (step %d)", ckpt_file, progress["epoch"], progress["step"])

    hparams = {**{k: v for k, v in (choices or {}).items()}, **flatten(cfg)}
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    # On resume, drop points logged after the checkpoint so curves don't double back.
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=progress["step"] + 1 if progress["step"] else None)
    writer.add_text("model/summary", summary.to_markdown(), progress["step"])
    flips = FlipTracker(model)  # sign changes of binary weights between log points
    show_bar = tc.progress is True or tc.progress == "true" or (tc.progress == "auto" and sys.stderr.isatty())

    def checkpoint(name: str) -> None:
        if tc.checkpoint:
            save_checkpoint(run_dir / "checkpoints" / name, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": progress, "rng": rng_state(),
                "binarized_layers": binarized, "config": config_dict})

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
        write_json_atomic(run_dir / "metrics.json", metrics)
        return metrics

    # ---- epochs --------------------------------------------------------------------------
    metrics = write_metrics("running")
    with logging_redirect_tqdm():
        for epoch in range(progress["epoch"], tc.epochs):
            data.train.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not show_bar,
                       leave=False, dynamic_ncols=True)
            sum_loss, sum_correct, seen = 0.0, 0, 0
            win_loss, win_correct, win_seen = 0.0, 0, 0
            for i, (x, y) in enumerate(data.train):
                if i >= steps_per_epoch:
                    break
                with autocast:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"non-finite loss ({loss.item()}) at step {progress['step'] + 1}; "
                                        f"lower optim.lr or check the data (last good checkpoint kept)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                clip_latent_(model, cfg.method.clip_latent)  # latent weights back into [-c, c]
                scheduler.step()
                progress["step"] += 1

                n, correct = y.numel(), (logits.argmax(1) == y).sum().item()
                sum_loss, sum_correct, seen = sum_loss + loss.item() * n, sum_correct + correct, seen + n
                win_loss, win_correct, win_seen = win_loss + loss.item() * n, win_correct + correct, win_seen + n
                if progress["step"] % tc.log_every_n_steps == 0:
                    writer.add_scalar("train/loss", win_loss / win_seen, progress["step"])
                    writer.add_scalar("train/acc", win_correct / win_seen, progress["step"])
                    writer.add_scalar("lr", optimizer.param_groups[0]["lr"], progress["step"])
                    for tag, ratio in flips.update().items():
                        writer.add_scalar(tag, ratio, progress["step"])
                    win_loss, win_correct, win_seen = 0.0, 0, 0
                bar.set_postfix(loss=f"{sum_loss / seen:.3f}", acc=f"{sum_correct / seen:.3f}",
                                samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
                bar.update()
            bar.close()
            epoch_time = time.perf_counter() - t0

            val_loss, val_acc = evaluate(model, data.val, tc.limit_val_batches, autocast)
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
            if (epoch + 1) % tc.hist_every_n_epochs == 0 or epoch + 1 == tc.epochs:
                log_latent_histograms(writer, model, step)
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
    log.info("best val acc %.4f, final %.4f, %d epochs in %.1f s -> %s", metrics["best_val_acc"],
             metrics["final_val_acc"] or 0.0, metrics["epochs_completed"], metrics["train_time_s"], run_dir)
    return metrics


@torch.no_grad()
def evaluate(model, loader, limit: int | None, autocast) -> tuple[float, float]:
    """(mean loss, accuracy) over the first `limit` batches of `loader` (all when None)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        with autocast:
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _limit(n_batches: int, limit: int | None) -> int:
    return n_batches if limit is None else min(n_batches, limit)


def _resume_file(cfg, run_dir: Path) -> Path | None:
    """checkpoints/last.pt of this run dir when trainer.resume, else ckpt_path, else None."""
    if cfg.trainer.resume:
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            return last
        if cfg.ckpt_path is None:
            raise CheckpointError(f"trainer.resume=true but {last} does not exist; point hydra.run.dir at the "
                                  f"run to resume (or pass ckpt_path=PATH)")
    return Path(cfg.ckpt_path) if cfg.ckpt_path is not None else None


def _restore(path: Path, model, optimizer, scheduler) -> dict:
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: does not match this model/method/data ({first}); "
                              f"use the same model, method and data as the run that wrote it") from None
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]
