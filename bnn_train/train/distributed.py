"""Data-parallel training under torchrun: process group, device, DDP wrapping, rank-0 writing.

`torchrun --nproc_per_node=N train.py ...` starts N processes; each trains on its slice of every
global batch (`data.batch_size` stays the global batch) and DistributedDataParallel averages the
gradients, so N processes train the same recipe as one. Only rank 0 writes logs and files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bnn_train.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> Dist:
    """Rank and world size that torchrun puts in the environment (a single process otherwise)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(d: Dist, device: torch.device, batch_size: int) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this process's device."""
    if not d.enabled:
        return device
    if batch_size % d.world:
        raise ConfigError(f"data.batch_size={batch_size}: must be divisible by the {d.world} processes "
                          f"(it is the global batch)")
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP around the model. On CUDA BatchNorm becomes SyncBatchNorm, so its statistics cover the
    global batch; PyTorch has no CPU SyncBatchNorm, so on CPU each process normalizes its slice."""
    if not d.enabled:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum of `values` over all processes (the values themselves in a single process)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
