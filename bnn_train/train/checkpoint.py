"""Checkpoints: latent fp32 weights, optimizer, scheduler, progress, RNG state and the config.

Written to a temporary file and renamed into place, so an interrupted save leaves the previous
checkpoint intact. Loaded with weights_only=True: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bnn_train.errors import CheckpointError


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file; pass the path of a .pt file written by a run "
                              f"(<run dir>/checkpoints/last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint (truncated, corrupt "
                              f"or another format); pass a checkpoint written by bnn-train") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path}: not a bnn-train checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
