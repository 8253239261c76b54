"""Datasets for training: `build_data(cfg.data, device, seed)` -> DataBundle.

    bundle = build_data(cfg.data, device=torch.device("cpu"), seed=0)
    for epoch in range(epochs):
        bundle.train.set_epoch(epoch)          # deterministic shuffling/augmentation per epoch
        for x, y in bundle.train: ...          # x float32 [B, C, H, W] normalized, y int64 [B]
        for x, y in bundle.val: ...

Small sets (digits, mnist, cifar10, synthetic, imagefolder in memory) live on the device as
uint8 tensors; see `loaders.py`. Large ImageFolder trees stream from disk; see `imagefolder.py`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from bnn_train.errors import ConfigError

from .common import DataBundle
from .imagefolder import build_imagefolder
from .sources import build_cifar10, build_digits, build_mnist, build_synthetic

__all__ = ["BUILDERS", "DataBundle", "build_data"]

log = logging.getLogger(__name__)

Builder = Callable[..., DataBundle]

# data.name -> builder(cfg_data, device, seed). One entry per configs/data/*.yaml.
BUILDERS: dict[str, Builder] = {
    "digits": build_digits,
    "mnist": build_mnist,
    "cifar10": build_cifar10,
    "imagefolder": build_imagefolder,
    "synthetic": build_synthetic,
}


def build_data(cfg_data, device: torch.device | str = "cpu", seed: int = 0) -> DataBundle:
    """Build train/val loaders for `cfg_data` (the `cfg.data` node) with data on `device`.

    `seed` drives shuffling and augmentation only; the data and its splits never depend on it.
    Raises ConfigError for an unknown data.name and DataError for missing or broken data.
    """
    name = cfg_data.get("name")
    builder = BUILDERS.get(name)
    if builder is None:
        choices = ", ".join(sorted(BUILDERS))
        raise ConfigError(f"unknown data.name={name!r}: choose one of {choices} (data=NAME)")
    bundle = builder(cfg_data, torch.device(device), int(seed))
    log.info(
        "data %s: %d train / %d val images, %dx%dx%d, %d classes, %d train batches of %d",
        bundle.name,
        bundle.num_train,
        bundle.num_val,
        bundle.in_channels,
        bundle.image_size,
        bundle.image_size,
        bundle.num_classes,
        len(bundle.train),
        bundle.train.batch_size,
    )
    return bundle
