"""The `data` group's schemas: one dataclass per option, the defaults of configs/data/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnn_train.errors import one_of, require

ENV_ROOT, ENV_CACHE = "${oc.env:BNN_DATA_ROOT,data}", "${oc.env:BNN_CACHE_DIR,data/.cache}"



@dataclass
class DataConfig:
    name: str = "???"
    root: str = ENV_ROOT
    batch_size: int = 128
    num_workers: int = 0
    download: bool = False
    augment: bool = False

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")


@dataclass
class Cifar10Config(DataConfig):
    name: str = "cifar10"
    download: bool = True
    augment: bool = True
    cache_dir: str = ENV_CACHE


@dataclass
class MnistConfig(DataConfig):
    name: str = "mnist"
    batch_size: int = 100
    download: bool = True


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    batch_size: int = 64


@dataclass
class SyntheticDataConfig(DataConfig):
    name: str = "synthetic"
    batch_size: int = 64
    num_classes: int = 10
    channels: int = 3
    image_size: int = 16
    train_size: int = 1024
    val_size: int = 256
    noise: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        require(self.num_classes >= 2, "num_classes", self.num_classes, "must be >= 2")
        for key in ("channels", "image_size", "train_size", "val_size"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        require(self.noise >= 0, "noise", self.noise, "must be >= 0")


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "imagefolder"
    num_workers: int = 2
    augment: bool = True
    image_size: int = 32
    in_memory: Any = "auto"
    max_memory_gb: float = 4.0
    cache_dir: str = ENV_CACHE

    def __post_init__(self):
        super().__post_init__()
        require(self.image_size >= 1, "image_size", self.image_size, "must be >= 1")
        one_of(self, "in_memory", "auto", "true", "false")
        require(self.max_memory_gb > 0, "max_memory_gb", self.max_memory_gb, "must be > 0")


DATA_SCHEMAS = {"cifar10": Cifar10Config, "mnist": MnistConfig, "digits": DigitsConfig,
                "synthetic": SyntheticDataConfig, "imagefolder": ImageFolderConfig}
