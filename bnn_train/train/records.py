"""What a run writes besides checkpoints: metrics.json and TensorBoard histograms / HParams.

Files are written atomically (`write_atomic`): a temporary file beside the target, flushed to
disk, then renamed over it, so a reader or a resumed run never sees a half-written file, and a
failed write (full disk, read-only folder) removes its temporary file, leaves the previous
version in place and stops the run with one line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from bnn_train.binarize import binary_layers
from bnn_train.errors import TrainingError

if TYPE_CHECKING:  # the loop imports tensorboard; this module does not need it to load
    from torch.utils.tensorboard import SummaryWriter


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, rename it onto `path`.

    Any OSError (ENOSPC, EROFS, EACCES, ...) removes the temporary file and becomes a one-line
    TrainingError naming `path`; `path` itself is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a file whose data is still in flight
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise write_error(path, err) from err
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    """metrics.json and friends: a reader never sees a half-written file."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    write_atomic(path, lambda f: f.write(text.encode()))


def write_error(path: Path, err: OSError) -> TrainingError:
    """One line: which file could not be written, why, and what to do about it."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space, or set hydra.run.dir to a folder on another disk"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make the folder writable, or set hydra.run.dir to a writable folder"
    else:
        advice = "check the folder, or set hydra.run.dir to another one"
    kept = f"; the previous {path.name} is kept" if path.is_file() else ""
    return TrainingError(f"cannot write {path} ({reason}): {advice}{kept}")


def _remove_quietly(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


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
