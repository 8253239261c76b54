"""In-memory batch loader and batched, on-device augmentation and normalization.

A split lives on the device once, as a uint8 [N, C, H, W] tensor. Each batch is an index into it;
augmentation and normalization are whole-batch tensor ops, so nothing per-sample runs in Python.
All randomness of an epoch comes from one CPU generator seeded from (seed, epoch): the batches are
the same on CPU and GPU, and a resumed run sees the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator for one epoch; SeedSequence mixes (seed, epoch) well, unlike seed + epoch."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(epoch) % 2**64])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]))


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std (in [0, 1] units) of a uint8 [N, C, H, W] tensor.

    Uses a 256-bin histogram per channel, so no float copy of the whole set is ever made.
    """
    c = x.shape[1]
    hist = torch.zeros(c, 256, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        for ch in range(c):
            hist[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256).double().cpu()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1)
    mean = (hist * values).sum(1) / count
    var = (hist * values**2).sum(1) / count - mean**2
    std = var.clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


class Normalizer:
    """uint8 batch -> float32 (x / 255 - mean) / std, as one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


def random_crop(x: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop each image of x [B, C, H, W] from its zero-padded copy at offsets [B, 2] (dy, dx).

    Offsets lie in [0, 2 * pad]; offset pad is the identity. One advanced-indexing gather.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [B, W]
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images of x [B, C, H, W] where flip [B] is True."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop with `pad` pixels of zero padding, optional flip."""

    pad: int
    flip: bool = True

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample crop offsets [n, 2] and flip flags [n] for a whole epoch."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        if not self.flip:
            flips.zero_()
        return offsets, flips

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        if self.pad > 0:
            x = random_crop(x, self.pad, offsets)
        if self.flip:
            x = random_flip(x, flips)
        return x


class TensorLoader:
    """Batches of (normalized float32 x, int64 y) from uint8 tensors already on the device.

    train=True: shuffled per epoch, augmented, drops the last partial batch.
    train=False: fixed order, no augmentation, keeps the last partial batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        normalizer: Normalizer,
        *,
        train: bool,
        augment: Augment | None = None,
        seed: int = 0,
    ):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.epoch, self.start_batch = 0, 0
        self.rank, self.world = 0, 1

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def shard(self, rank: int, world: int) -> None:
        """Training batches: yield only this process's slice of every global batch.

        The epoch's order and augmentation are drawn for the global batch, so the union over
        ranks is exactly the single-process batch (data-parallel training of the same recipe).
        """
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the shuffling and augmentation of `epoch` (deterministic given the seed);
        start_batch > 0 resumes that epoch after its first `start_batch` training batches."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.train else -(-n // bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for start in range(0, self.num_samples, self.batch_size):
                end = start + self.batch_size
                yield self.normalizer(self.x[start:end]), self.y[start:end]
            return
        # Draw the whole epoch's randomness up front on the CPU and move it once: no per-batch
        # host-to-device transfers, and identical batches whatever the device.
        n, device = self.num_samples, self.x.device
        gen = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(n, generator=gen).to(device)
        if self.augment is not None:
            offsets, flips = (t.to(device) for t in self.augment.draw(n, gen))
        part = self.batch_size // self.world
        for i in range(self.start_batch, len(self)):
            start = i * self.batch_size + self.rank * part
            sl = slice(start, start + part)
            idx = perm[sl]
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, offsets[sl], flips[sl])
            yield self.normalizer(xb), self.y[idx]
