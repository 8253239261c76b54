"""One optimizer step (`train_step`) and one validation pass (`evaluate`), shared by the training
loop and the training-step benchmark.

Neither reads a tensor back to the host per batch: losses and correct counts are summed on the
device (`Tally`) and read only where the loop reports or saves them, so the host queues the next
step while the device still computes this one. The one exception is `StepParts.check_finite`,
which runs that skip non-finite batches need.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bnn_train.binarize import clip_latent_
from bnn_train.train.distill import distillation_loss
from bnn_train.train.losses import LOSSES


@dataclass
class StepParts:
    """What `train_step` needs, built once per run."""

    model: nn.Module  # what runs forward: the network, possibly under DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: object | None = None  # stepped once per optimizer step
    loss_fn: Callable[[Tensor, Tensor], Tensor] = LOSSES["cross_entropy"]
    teacher: nn.Module | None = None  # frozen; with it the loss is `distillation_loss` under `distill`
    distill: object = None  # cfg.teacher
    penalty: Callable[[], Tensor] | None = None  # added to the loss (method.reg)
    clip: float | None = None  # method.clip_latent
    autocast: object = field(default_factory=nullcontext)
    layout: torch.memory_format = torch.contiguous_format
    # Read each loss on the host before its update, so that a non-finite one can be skipped
    # (trainer.skip_nonfinite > 0): one host sync per step, which runs without skipping do not pay.
    check_finite: bool = False


class Tally:
    """Sums of loss * batch size and of correct predictions over an epoch and over the current log
    window, and the first non-finite loss with its step, all kept on the device.

    float64 makes the sums the same arithmetic as adding `loss.item() * n` on the host, and exact
    when a resumed epoch starts from sums saved in a checkpoint."""

    def __init__(self, device: torch.device, loss: float = 0.0, correct: int = 0, win_loss: float = 0.0,
                 win_correct: int = 0):
        self.sums = torch.tensor([[loss, correct], [win_loss, win_correct]], dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(2, dtype=torch.float64, device=device)  # (step or 0, loss)

    def add(self, loss: Tensor, logits: Tensor, y: Tensor, step: int) -> None:
        self.sums += _batch_sums(loss, logits, y)  # both rows: the epoch's and the window's
        value = loss.detach().double()
        fresh = ~torch.isfinite(value) & (self.first_bad[0] == 0)
        self.first_bad = torch.where(fresh, torch.stack([torch.full_like(value, step), value]), self.first_bad)

    def reset_window(self) -> None:
        self.sums[1].zero_()

    def read(self) -> dict:
        """The sums on the host: the one sync."""
        (loss, correct), (win_loss, win_correct), (bad_step, bad_loss) = torch.cat(
            [self.sums, self.first_bad[None]]).tolist()
        return {"loss": loss, "correct": int(correct), "win_loss": win_loss, "win_correct": int(win_correct),
                "bad_step": int(bad_step), "bad_loss": bad_loss}


def train_step(s: StepParts, x: Tensor, y: Tensor, tally: Tally | None = None, step: int = 0) -> tuple[Tensor, bool]:
    """One optimizer step on the batch (x, y), adding its loss and correct count to `tally`
    (`step` numbers it there). Returns (loss, whether the parameters were updated): only with
    `s.check_finite` is a non-finite loss caught here, before the update."""
    x = _layout(x, s.layout)
    with s.autocast:
        logits = s.model(x)
        if s.teacher is None:
            loss = s.loss_fn(logits.float(), y)
        else:  # distillation from the frozen teacher; train/loss logs this loss
            with torch.no_grad():
                teacher_logits = s.teacher(x)
            loss = distillation_loss(logits.float(), teacher_logits.float(), y, s.distill)
        if s.penalty is not None:
            loss = loss + s.penalty()
    if s.check_finite and not torch.isfinite(loss):  # host sync, only when non-finite batches may be skipped
        return loss.detach(), False
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    clip_latent_(s.model, s.clip)  # latent weights back into [-c, c]
    if s.scheduler is not None:
        s.scheduler.step()
    if tally is not None:
        tally.add(loss, logits, y, step)
    return loss.detach(), True


@torch.no_grad()
def evaluate(model, loader, limit: int | None, autocast=nullcontext(), layout=torch.contiguous_format,
             loss_fn=LOSSES["cross_entropy"]) -> tuple[float, float]:
    """(mean loss, accuracy) over the first `limit` batches of `loader` (all when None)."""
    model.eval()
    sums, seen = None, 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        with autocast:
            logits = model(_layout(x, layout)).float()
        batch = _batch_sums(loss_fn(logits, y), logits, y)
        sums = batch if sums is None else sums + batch
        seen += y.numel()
    if sums is None:
        return 0.0, 0.0
    total_loss, correct = sums.tolist()
    return total_loss / seen, correct / seen


def _batch_sums(loss: Tensor, logits: Tensor, y: Tensor) -> Tensor:
    """(loss * n, correct predictions) of one batch as a float64 pair on the device."""
    correct = (logits.detach().argmax(1) == y).sum()
    return torch.stack([loss.detach().double() * y.numel(), correct.double()])


def _layout(x: Tensor, layout: torch.memory_format) -> Tensor:
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x
