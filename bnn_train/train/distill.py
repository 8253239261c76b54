"""Knowledge distillation: a frozen full-precision teacher and the losses that train against it.

`teacher=checkpoint teacher.path=PATH` loads the teacher (`load_teacher`) from either

- a checkpoint written by a bnn-train run (a dict with "model" and "config"): the architecture and
  its binarization are rebuilt from the saved config with `build_network`, so any model x method
  a run can train can teach (usually a `method=fp` run); or
- a plain state dict (`torch.save(model.state_dict(), PATH)`), with `teacher.model=NAME` naming a
  registered architecture, built in full precision (`method=fp`). Our own key names load as they
  are; torchvision's / timm's ResNet names (conv1, bn1, layer1-4, fc) are mapped onto ours
  (stem.0, stem.1, stages.0-3, fc). A "module." prefix (DataParallel / DDP) and a Lightning-style
  {"state_dict": ...} wrapper are accepted.

Files are read with `torch.load(weights_only=True)`, so a teacher file cannot run code. A file that
cannot be read, or whose weights do not fit the data (class count, input channels) or the
architecture, stops with one line naming the file and the mismatch.

`distillation_loss` picks the loss by `teacher.loss` from `LOSSES`: `kd` (Hinton et al. 2015) or
`distribution` (ReActNet, Liu et al. 2020).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from bnn_train.errors import CheckpointError, ConfigError, one_of, require
from bnn_train.train.checkpoint import check_checkpoint_file
from bnn_train.train.setup import build_network

log = logging.getLogger(__name__)

_HINT = ("set teacher.path to a bnn-train checkpoint (<run dir>/checkpoints/best.pt) or to a state dict "
         "saved with torch.save(model.state_dict(), PATH)")

# ---- the `teacher` group's schemas (the defaults of configs/teacher) ----


@dataclass
class NoTeacherConfig:
    name: str = "none"


@dataclass
class TeacherConfig:
    """teacher=checkpoint: a frozen teacher for knowledge distillation (bnn_train/train/distill.py)."""

    name: str = "checkpoint"
    path: str = "???"
    model: Optional[str] = None
    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self):
        one_of(self, "loss", "kd", "distribution")
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require(0 <= self.alpha <= 1, "alpha", self.alpha, "must be in [0, 1]")
        require(self.model is None or self.model in _models(), "model", self.model,
                 "choose one of " + ", ".join(_models()) + " (or null for a bnn-train checkpoint)")


TEACHER_SCHEMAS = {"none": NoTeacherConfig, "checkpoint": TeacherConfig}


def _models():
    from bnn_train.models import MODELS

    return MODELS


# The full-precision method a plain state dict is built with (configs/method/fp.yaml).
_FP = {"name": "fp"}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float = 4.0,
            alpha: float = 0.9) -> Tensor:
    """Soft-target knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
    in a Neural Network", sec. 2):

        L = alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE(s, y)

    with s, t the student's and teacher's logits, tau the temperature and both terms averaged
    over the batch. The tau^2 factor keeps the soft term's gradients, which scale as 1/tau^2, on
    the same scale as the hard term's when tau changes. alpha=0 is plain cross-entropy.
    """
    teacher_logits = teacher_logits.detach()
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def distribution_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """ReActNet's distributional loss (Liu, Shen, Savvides & Cheng 2020, "ReActNet: Towards
    Precise Binary Neural Network with Generalized Activation Functions", sec. 3.3, eq. 5):

        L = -(1/n) * sum_i sum_c p_c^T(x_i) * log(p_c^S(x_i) / p_c^T(x_i))

    i.e. the batch mean of KL(p^T || p^S) between the teacher's and the student's softmax
    outputs at temperature 1. The labels are not used: the binary student matches the real
    teacher's distribution only. Its gradient with respect to the student's logits is
    (p^S - p^T) / n.
    """
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits.detach(), dim=1),
                    reduction="batchmean", log_target=True)


# teacher.loss -> fn(student_logits, teacher_logits, targets, cfg_teacher)
LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, Mapping], Tensor]] = {
    "kd": lambda s, t, y, cfg: kd_loss(s, t, y, float(cfg.get("temperature", 4.0)), float(cfg.get("alpha", 0.9))),
    "distribution": lambda s, t, y, cfg: distribution_loss(s, t),
}


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, cfg_teacher) -> Tensor:
    """The loss `cfg_teacher.loss` names (see `LOSSES`, `kd_loss`, `distribution_loss`); pass fp32
    logits. The teacher's logits are treated as constants."""
    name = cfg_teacher.get("loss", "kd")
    if name not in LOSSES:
        raise ConfigError(f"teacher.loss={name}: choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](student_logits, teacher_logits, targets, cfg_teacher)


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


class FrozenTeacher(nn.Module):
    """A network that stays in eval mode with no gradients: `train()` (also a parent's) is a no-op,
    its parameters have requires_grad=False and its forward runs under torch.no_grad()."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_teacher(cfg_teacher, in_channels: int, num_classes: int, image_size: int,
                  device: torch.device | str = "cpu") -> FrozenTeacher | None:
    """None for teacher=none, else `load_teacher`."""
    if cfg_teacher is None or cfg_teacher.get("name", "none") == "none":
        return None
    return load_teacher(cfg_teacher, in_channels, num_classes, image_size, device)


def load_teacher(cfg_teacher, in_channels: int, num_classes: int, image_size: int,
                 device: torch.device | str = "cpu") -> FrozenTeacher:
    """The frozen teacher from `cfg_teacher.path` for data with these channels, classes and size."""
    path = Path(str(cfg_teacher.get("path")))
    wanted = cfg_teacher.get("model")
    obj = _read(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("config"), Mapping):
        state, net, what = _from_run_checkpoint(path, obj, wanted, in_channels, num_classes, image_size)
    else:
        state = _plain_state_dict(path, obj)
        if wanted is None:
            from bnn_train.models import MODELS

            raise ConfigError(f"teacher {path}: a plain state dict ({len(state)} tensors) does not say which "
                              f"architecture it holds; set teacher.model=NAME ({', '.join(MODELS)})")
        state, net, what = _from_state_dict(path, state, str(wanted), in_channels, num_classes, image_size)
    _check_fit(path, state, net, what, in_channels, num_classes, image_size)
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"teacher {path}: does not fit {what} ({_one_line(err)}); {_HINT}") from None
    teacher = FrozenTeacher(net).to(device)
    log.info("teacher: %s from %s, %d parameters, frozen", what, path, sum(p.numel() for p in net.parameters()))
    return teacher


def _from_run_checkpoint(path: Path, obj: Mapping, wanted, in_channels: int, num_classes: int,
                         image_size: int) -> tuple[dict, nn.Module, str]:
    """Rebuild model and binarization from the config a bnn-train run saved with its weights."""
    saved = obj["config"]
    names = {g: (saved.get(g) or {}).get("name") if isinstance(saved.get(g), Mapping) else None
             for g in ("model", "method")}
    what = f"model={names['model']} method={names['method']}"
    if wanted is not None and wanted != names["model"]:
        raise ConfigError(f"teacher {path}: a bnn-train checkpoint of {what}, but teacher.model={wanted}; "
                          f"drop teacher.model (it is only for plain state dicts) or pick the right file")
    try:
        net, _ = build_network(OmegaConf.create(dict(saved)), in_channels, num_classes, image_size,
                               stage=obj.get("stage"))
    except (ConfigError, OmegaConfBaseException, KeyError, AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"teacher {path}: the network of its saved config ({what}) cannot be built here "
                              f"({_one_line(err)}); use a checkpoint written by this version of bnn-train") from None
    return dict(obj["model"]), net, what


def _from_state_dict(path: Path, state: dict, name: str, in_channels: int, num_classes: int,
                     image_size: int) -> tuple[dict, nn.Module, str]:
    """Build registered architecture `name` in full precision; map torchvision ResNet key names."""
    from bnn_train.models import MODELS

    if name not in MODELS:
        raise ConfigError(f"teacher.model={name}: unknown model; choose one of: {', '.join(MODELS)}")
    model_cfg = {**OmegaConf.to_container(OmegaConf.structured(MODELS.schemas[name])), "name": name}
    what = f"teacher.model={name}"
    if _has_torchvision_resnet_keys(state):
        kernel = state["conv1.weight"].shape[-1] if getattr(state["conv1.weight"], "ndim", 0) == 4 else 7
        if "stem" in model_cfg:  # torchvision's stem is 7x7/2 + max-pool; CIFAR ports use a 3x3 conv
            model_cfg["stem"] = "imagenet" if kernel == 7 else "cifar"
        state = _torchvision_to_ours(state)
        log.info("teacher %s: torchvision ResNet key names mapped onto ours", path)
    cfg = OmegaConf.create({"model": model_cfg, "method": dict(_FP), "ste": {"name": "identity"}})
    net, _ = build_network(cfg, in_channels, num_classes, image_size)
    return state, net, what


def _has_torchvision_resnet_keys(state: Mapping) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


_TORCHVISION = [(re.compile(r"^conv1\."), "stem.0."), (re.compile(r"^bn1\."), "stem.1.")]
_LAYER = re.compile(r"^layer(\d+)\.")


def _torchvision_to_ours(state: Mapping) -> dict:
    """conv1 -> stem.0, bn1 -> stem.1, layer{i}.{j}.X -> stages.{i-1}.{j}.X; fc and the block
    names (conv1/bn1/conv2/bn2/downsample.{0,1}) are the same in both."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _TORCHVISION:
            key = pattern.sub(repl, key)
        key = _LAYER.sub(lambda m: f"stages.{int(m.group(1)) - 1}.", key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Reading the file and checking that it fits
# ---------------------------------------------------------------------------------------------


def check_teacher_file(path: str | Path) -> None:
    """Raise a one-line CheckpointError naming the teacher file when it is missing, empty, text,
    truncated or of an unknown format, without loading it (cheap: for the command-line checks)."""
    path = Path(path)
    try:
        check_checkpoint_file(path)
    except CheckpointError as err:
        raise CheckpointError(_reword(str(err), path)) from None


def _read(path: Path):
    """torch.load(weights_only=True) with one-line errors that name the teacher file."""
    check_teacher_file(path)  # missing, empty, text, truncated: before loading anything
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(f"teacher {path}: holds Python objects that weights_only loading refuses (a whole "
                                  f"nn.Module or a DictConfig?); save it with torch.save(model.state_dict(), PATH)") from None
        raise CheckpointError(f"teacher {path}: is corrupt or not a PyTorch file ({_one_line(err)}); {_HINT}") from None
    except Exception as err:  # noqa: BLE001  (torch raises many types for a damaged file)
        raise CheckpointError(f"teacher {path}: cannot be read as a PyTorch file, truncated or corrupt "
                              f"({_one_line(err)}); {_HINT}") from None


def _reword(message: str, path: Path) -> str:
    """check_checkpoint_file's "checkpoint PATH: problem; <run hint>" as "teacher PATH: problem; <teacher hint>"."""
    prefix = f"checkpoint {path}: "
    message = message.removeprefix(prefix)
    cut = message.find("; pass a checkpoint written by a bnn-train run")
    if cut >= 0:
        message = message[:cut]
    return f"teacher {path}: {message}; {_HINT}"


def _plain_state_dict(path: Path, obj) -> dict:
    """A {name: tensor} dict (also inside {"state_dict": ...} or {"model": ...}; "module." stripped)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        if isinstance(obj, Mapping):
            keys = list(obj)
            shown = ", ".join(repr(k) for k in keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")
            what = f"a dict of {shown}" if keys else "an empty dict"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(f"teacher {path}: holds {what}, neither a bnn-train checkpoint (model and config) "
                              f"nor a state dict of tensors; {_HINT}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_fit(path: Path, state: dict, net: nn.Module, what: str, in_channels: int, num_classes: int,
               image_size: int) -> None:
    """Class count, input size, then every tensor: the first problem as one line naming the file."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers:
        last = state.get(f"{layers[-1][0]}.weight")
        if isinstance(last, Tensor) and last.ndim >= 2 and last.shape[0] != num_classes:
            raise CheckpointError(f"teacher {path}: {last.shape[0]} classes, the data has {num_classes}; "
                                  f"use a teacher trained on this data")
        first_name, first_layer = layers[0]
        first = state.get(f"{first_name}.weight")
        if isinstance(first, Tensor) and first.ndim >= 2 and first.shape[1] != first_layer.weight.shape[1]:
            if isinstance(first_layer, nn.Conv2d):
                raise CheckpointError(f"teacher {path}: takes {first.shape[1]}-channel images, the data has "
                                      f"{in_channels} channels; use a teacher trained on this data")
            raise CheckpointError(f"teacher {path}: takes {first.shape[1]} input values per image, the data has "
                                  f"{in_channels}x{image_size}x{image_size} = {in_channels * image_size ** 2}; "
                                  f"use a teacher trained on this data")
    ours = net.state_dict()
    for key in ours:  # BatchNorm counters are absent from some older files; they do not affect eval
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = ours[key]
    resized = [k for k in ours if k in state and tuple(getattr(state[k], "shape", ())) != tuple(ours[k].shape)]
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    problems = []
    if resized:
        k = resized[0]
        more = f" and {len(resized) - 1} more" if len(resized) > 1 else ""
        problems.append(f"{k} is {list(getattr(state[k], 'shape', ()))} in the file, {list(ours[k].shape)} here{more}")
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors it has that {what} lacks: {_few(unexpected)}")
    if problems:
        raise CheckpointError(f"teacher {path}: its weights do not fit {what} ({'; '.join(problems)}); "
                              f"check teacher.model and the data")


def _few(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _one_line(err: BaseException) -> str:
    text = "; ".join(line.strip().rstrip(":.") for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
