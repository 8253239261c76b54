"""Checkpoints: latent fp32 weights, optimizer, scheduler, progress, RNG state and the config.

Written to a temporary file and renamed into place, so an interrupted save leaves the previous
checkpoint intact. Loaded with weights_only=True: a checkpoint cannot run code.

Every way a checkpoint can be unusable stops with one line that names the file and what is wrong:
not there, empty, truncated, not a checkpoint at all (`check_checkpoint_file`, cheap enough for
the command line to call before any work), unreadable by torch (`load_checkpoint`), missing the
entries a run needs (`read_checkpoint`), or written for another model / method / data / optimizer
(`restore_checkpoint`, which says which settings differ: `describe_mismatch`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bnn_train.errors import CheckpointError
from bnn_train.train.records import write_atomic

# What restore_checkpoint needs besides "model"; "config" and "binarized_layers" are informative.
REQUIRED = ("model", "optimizer", "scheduler", "progress", "rng")
# progress entries the loop reads; newer entries get the value an epoch-end checkpoint implies.
PROGRESS_REQUIRED = ("epoch", "step", "best_val_acc", "history", "train_time_s", "train_samples")
PROGRESS_DEFAULTS = {"skipped_nonfinite": 0, "partial": None}

_HINT = "pass a checkpoint written by a bnn-train run (<run dir>/checkpoints/last.pt or best.pt)"


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save into a temporary file (a file object, so a full disk raises OSError rather than
    torch's opaque zip-writer error), fsync, rename; a failed save raises a one-line TrainingError."""
    write_atomic(Path(path), lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def check_checkpoint_file(path: str | Path) -> None:
    """Raise CheckpointError when `path` cannot be a readable checkpoint, without loading it.

    Reads the first bytes and, for a zip (torch's format since 1.6), the end-of-archive record,
    so a missing, empty, text, foreign or truncated file is caught before any data is loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file; {_HINT}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, not a file; {_HINT}")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(512)
        is_zip = head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({err.strerror or err}); check its "
                              f"permissions") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: is empty (0 bytes); {_HINT}")
    if head.startswith(b"PK\x03\x04"):
        if not is_zip:
            raise CheckpointError(f"checkpoint {path}: is truncated or corrupt ({size} bytes, the end of "
                                  f"the zip archive is missing; an interrupted copy?); copy it again, or "
                                  f"use the run's other checkpoint (best.pt / last.pt)")
        return
    if head.startswith(b"\x80"):  # a pickle: torch's legacy (pre-1.6) format; torch.load decides
        return
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:40] if head.strip() else ""
        raise CheckpointError(f"checkpoint {path}: is a text file (starts {first!r}), not a PyTorch "
                              f"checkpoint; {_HINT}")
    raise CheckpointError(f"checkpoint {path}: is not a PyTorch checkpoint (unknown format, first bytes "
                          f"{head[:8].hex(' ')}); {_HINT}")


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) with one-line errors; the result holds at least "model"."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _first_line(err)
        if "weights only" in reason.lower():  # a pickled object, e.g. a DictConfig or a whole nn.Module
            raise CheckpointError(f"checkpoint {path}: holds Python objects that weights_only loading refuses "
                                  f"({_weights_only_culprit(err)}); save tensors and plain containers only "
                                  f"(a config as OmegaConf.to_container), or {_HINT}") from None
        raise CheckpointError(f"checkpoint {path}: is corrupt or not a PyTorch checkpoint ({reason}); "
                              f"{_HINT}") from None
    except Exception as err:  # noqa: BLE001 -- torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint, truncated or "
                              f"corrupt ({_first_line(err)}); {_HINT}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a bnn-train checkpoint "
                              f"(a dict with model, optimizer, progress, ...); {_HINT}")
    if "model" not in state:
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"checkpoint {path}: is a bare state_dict ({len(state)} tensors), not a "
                                  f"bnn-train checkpoint (model, optimizer, progress, ...); {_HINT}")
        raise CheckpointError(f"checkpoint {path}: not a bnn-train checkpoint (no 'model' entry; it has "
                              f"{_few(list(state))}); {_HINT}")
    return state


def read_checkpoint(path: str | Path) -> dict:
    """load_checkpoint plus the entries a run needs to continue (optimizer, progress, ...)."""
    state = load_checkpoint(path)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks {_few(missing)}, which a run needs to continue from "
                              f"it (it has {_few(list(state))}); {_HINT}")
    progress = state["progress"]
    lacking = [k for k in PROGRESS_REQUIRED if k not in progress] if isinstance(progress, dict) else None
    if lacking is None or lacking:
        what = f"lacks {_few(lacking)}" if lacking else f"is a {type(progress).__name__}, not a dict"
        raise CheckpointError(f"checkpoint {path}: its 'progress' entry {what}; {_HINT}")
    state["progress"] = {**PROGRESS_DEFAULTS, **progress}
    return state


def restore_checkpoint(path: str | Path, cfg, model: torch.nn.Module, optimizer, scheduler,
                       state: dict | None = None) -> dict:
    """Load weights, optimizer, scheduler and RNG state from `path` into this run; return progress.

    Checks before touching anything that the weights and the optimizer's parameter groups fit
    this run; if not, the error names the file, the settings that differ between the run that
    wrote it and this one (from the config saved in it) and the first entry that does not fit.
    `state`: the already read checkpoint (read_checkpoint), to read it before building the data.
    """
    state = read_checkpoint(path) if state is None else state
    saved_config = state.get("config")
    problem = _weights_problem(state["model"], model.state_dict()) or _optimizer_problem(state["optimizer"],
                                                                                         optimizer)
    if problem:
        raise _mismatch(path, saved_config, cfg, problem)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise _mismatch(path, saved_config, cfg, _join_lines(err)) from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its scheduler or RNG state is damaged ({_join_lines(err)}); "
                              f"{_HINT}") from None
    return state["progress"]


# ---------------------------------------------------------------------------------------------
# Explaining a checkpoint that does not fit
# ---------------------------------------------------------------------------------------------

# Settings that decide the shapes of the weights and of the optimizer state. A group's options are
# compared only when both runs chose the same option of it (model=mlp vs resnet20 says it all).
_GROUPS = ("model", "method", "data", "optim")
_IGNORED = {"model": {"dropout"}}                        # no effect on the state dicts
_ONLY = {"method": lambda k: k.startswith("keep_"),      # which layers are binarized
         "data": lambda k: k in ("num_classes", "channels", "image_size"),
         "optim": lambda k: False}                       # the optimizer's type is the option itself


def describe_mismatch(saved_config: Mapping | None, cfg) -> str | None:
    """"written for A, this run has B" over the settings that shape the weights and optimizer state,
    in override syntax (`model.width=64`, `method=bireal`, `data.num_classes=10`); None when the
    saved config is missing or no such setting differs."""
    before, after = _differences(saved_config, cfg)
    if not before:
        return None
    return f"written for {' '.join(before)}, this run has {' '.join(after)}"


def _differences(saved_config: Mapping | None, cfg) -> tuple[list[str], list[str]]:
    """(the checkpoint's values, this run's values) as overrides, for each setting that differs."""
    if not isinstance(saved_config, Mapping):
        return [], []
    current = _plain(cfg)
    before, after = [], []
    for group in _GROUPS:
        old, new = saved_config.get(group), current.get(group)
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            continue
        if old.get("name") != new.get("name"):
            before.append(f"{group}={old.get('name')}")
            after.append(f"{group}={new.get('name')}")
            continue
        keep = _ONLY.get(group, lambda k, g=group: k not in _IGNORED.get(g, set()))
        for key in sorted(set(old) | set(new)):
            if key != "name" and keep(key) and old.get(key) != new.get(key):
                before.append(f"{group}.{key}={_show(old.get(key))}")
                after.append(f"{group}.{key}={_show(new.get(key))}")
    return before, after


def _mismatch(path, saved_config, cfg, problem: str) -> CheckpointError:
    before, after = _differences(saved_config, cfg)
    if before:
        return CheckpointError(f"checkpoint {path}: does not match this run, written for {' '.join(before)}, "
                               f"this run has {' '.join(after)} "
                               f"({problem}); add {' '.join(before)} to use it, or start without this checkpoint")
    origin = ""
    if isinstance(saved_config, Mapping):
        names = [f"{g}={saved_config[g].get('name')}" for g in _GROUPS if isinstance(saved_config.get(g), Mapping)]
        origin = f" (it was written by a run with {' '.join(names)})" if names else ""
    return CheckpointError(f"checkpoint {path}: does not match this run's model and optimizer: {problem}; use the "
                           f"model, method, data and optim of the run that wrote it{origin}, or start without it")


def _weights_problem(saved: Any, current: dict) -> str | None:
    """The first way the saved weights differ from this model's, or None when they fit."""
    if not isinstance(saved, Mapping):
        return f"its model entry is a {type(saved).__name__}, not a state_dict"
    unexpected = [k for k in saved if k not in current]
    missing = [k for k in current if k not in saved]
    resized = [k for k in current if k in saved and _shape(saved[k]) != _shape(current[k])]
    parts = []
    if resized:
        k = resized[0]
        n = len(resized) - 1
        more = f" ({n} more {'tensors differ' if n > 1 else 'tensor differs'} in shape)" if n else ""
        parts.append(f"{k} is {_shape(saved[k])} in the checkpoint, {_shape(current[k])} here{more}")
    if missing:
        parts.append(f"this model has {len(missing)} tensors the checkpoint lacks: {_keys(missing)}")
    if unexpected:
        parts.append(f"the checkpoint has {len(unexpected)} tensors this model lacks: {_keys(unexpected)}")
    return "; ".join(parts) or None


def _optimizer_problem(saved: Any, optimizer) -> str | None:
    """Parameter groups of another size or another optimizer type (Adam vs SGD would only fail at
    the first step, with a KeyError from inside torch)."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list):
        return "its optimizer entry is not an optimizer state_dict"
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(ours):
        return f"optimizer state has {len(groups)} parameter groups, this run's optimizer {len(ours)}"
    for i, (g, o) in enumerate(zip(groups, ours)):
        if not isinstance(g, Mapping):
            return "its optimizer entry is not an optimizer state_dict"
        if len(g.get("params", [])) != len(o["params"]):
            return (f"optimizer parameter group {i} has {len(g.get('params', []))} tensors in the checkpoint, "
                    f"{len(o['params'])} here")
        theirs, mine = set(g) - {"params"}, set(o) - {"params"}
        # Keys only on one side come with torch versions; keys missing on both sides mean another type.
        if theirs - mine and mine - theirs:
            return (f"optimizer state is of another type ({', '.join(sorted(theirs - mine))} there, "
                    f"{', '.join(sorted(mine - theirs))} in this run's {type(optimizer).__name__})")
    return None


def _shape(value: Any) -> list | str:
    shape = getattr(value, "shape", None)
    return list(shape) if shape is not None else type(value).__name__


def _few(items: list, n: int = 3) -> str:
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _keys(keys: list[str]) -> str:
    """A few state_dict keys; many are summarized by their last name (`*.threshold x16`), which
    says what kind of tensor is missing (ReActNet's thresholds, RPReLU's gamma/beta/zeta...)."""
    if len(keys) <= 3:
        return _few(keys)
    counts: dict[str, int] = {}
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    kinds = ", ".join(f"*.{leaf} x{n}" for leaf, n in list(counts.items())[:6])
    more = ", ..." if len(counts) > 6 else ""
    return f"{kinds}{more} (e.g. {keys[0]!r})"


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _join_lines(err: BaseException) -> str:
    """torch's multi-line messages (load_state_dict lists every key) as one shortened line."""
    text = "; ".join(line.strip().rstrip(":.") for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _weights_only_culprit(err: BaseException) -> str:
    for line in str(err).splitlines():
        if "Unsupported global" in line or "unsupported" in line.lower():
            return line.strip().rstrip(".")[:200]
    return _first_line(err)[:200]


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return True


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
