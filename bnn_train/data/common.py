"""Shared pieces of the data package: the bundle the trainer receives and small helpers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import to_absolute_path

from bnn_train.errors import ConfigError

from .loaders import Augment, Normalizer, TensorLoader, channel_stats

log = logging.getLogger(__name__)

# The one fix that applies to every "data not found" message.
ROOT_FIX = "set data.root=PATH or BNN_DATA_ROOT"


@dataclass
class DataBundle:
    """Train/val loaders plus what a model needs to know about the data."""

    name: str
    train: Any  # TensorLoader or StreamingLoader: iterable of (x, y), len(), set_epoch()
    val: Any
    in_channels: int
    num_classes: int
    image_size: int
    num_train: int
    num_val: int
    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()  # per-channel, in [0, 1] units: x_norm = (x / 255 - mean) / std
    std: tuple[float, ...] = ()


class ImageSet(NamedTuple):
    """A split held in memory: x uint8 [N, C, H, W], y int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor


def resolve_root(root: Any) -> Path:
    """Absolute data root; relative paths are taken from where the user launched the run.

    `to_absolute_path` uses Hydra's original cwd when Hydra runs (it may chdir into the run dir),
    and the current directory otherwise.
    """
    return Path(to_absolute_path(str(Path(str(root)).expanduser())))


def batch_size_of(cfg) -> int:
    """`data.batch_size` as a positive int."""
    bs = cfg.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"data.batch_size must be a positive integer, got {bs!r}")
    return bs


def one_line(exc: object) -> str:
    """First non-empty line of an exception's message (library errors are often multi-line)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def val_order(n: int) -> torch.Tensor:
    """The fixed permutation in which validation samples are served (independent of the run seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def in_memory_bundle(
    name: str,
    train: ImageSet,
    val: ImageSet,
    cfg,
    device: torch.device,
    seed: int,
    *,
    num_classes: int,
    classes: tuple[str, ...] = (),
    flip: bool = True,
) -> DataBundle:
    """Put both splits on `device` once and wrap them in batch loaders.

    Normalization statistics come from the (un-augmented) training split. When `cfg.augment` is
    set, training batches get a random crop with zero padding of image_size // 8 (4 px for
    32x32, as in the standard CIFAR recipe) and, if `flip`, a random horizontal flip.
    """
    batch_size = batch_size_of(cfg)
    n, c, h, w = train.x.shape
    if h != w:
        raise ConfigError(f"{name}: images must be square, got {h}x{w}")
    if n < batch_size:
        raise ConfigError(
            f"{name}: data.batch_size={batch_size} is larger than the training set ({n} images): "
            f"set data.batch_size<={n}"
        )
    mean, std = channel_stats(train.x)
    normalizer = Normalizer(mean, std, device)
    augment = Augment(pad=h // 8, flip=flip) if cfg.augment else None
    x_train, y_train = train.x.to(device), train.y.to(device)
    # A fixed shuffle of the validation split: sources list it class by class, and a
    # trainer.limit_val_batches prefix must be a fair sample, not one class.
    order = val_order(len(val.y))
    x_val, y_val = val.x[order].to(device), val.y[order].to(device)
    train_loader = TensorLoader(
        x_train, y_train, batch_size, normalizer, train=True, augment=augment, seed=seed
    )
    val_loader = TensorLoader(x_val, y_val, batch_size, normalizer, train=False)
    return DataBundle(
        name=name,
        train=train_loader,
        val=val_loader,
        in_channels=c,
        num_classes=num_classes,
        image_size=h,
        num_train=n,
        num_val=len(val.y),
        classes=tuple(classes),
        mean=tuple(mean),
        std=tuple(std),
    )
