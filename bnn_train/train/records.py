"""What a run writes besides checkpoints: metrics.json and TensorBoard histograms / HParams."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from bnn_train.binarize import binary_layers


def write_json_atomic(path: Path, obj: dict) -> None:
    """Temp file + rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def log_latent_histograms(writer: SummaryWriter, model, step: int) -> None:
    """Histogram of each binarized layer's latent weights: shows saturation at the clip bound."""
    for name, layer in binary_layers(model):
        writer.add_histogram(f"latent/{name}", layer.weight.detach().float().cpu(), step)


def log_hparams(writer: SummaryWriter, hparams: dict, metrics: dict) -> None:
    """One row of the HParams table, in the run's own folder (run_name='.')."""
    writer.add_hparams(hparams, {f"hparams/{k}": v for k, v in metrics.items()}, run_name=".")


class NullWriter:
    """Stands in for SummaryWriter on processes that must not write (ranks other than 0)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
