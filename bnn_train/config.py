"""Typed configs: one dataclass per group option, registered in Hydra's ConfigStore as the schema of
its YAML (configs/GROUP/OPTION.yaml lists `/schema/GROUP/OPTION` first in its defaults).

The dataclass holds each key's one default (the YAML repeats it, with the comment the README's option
table shows; tests/test_config.py checks they agree). OmegaConf type-checks every override against
it; ranges and cross-key rules live next to the fields, in `__post_init__`, which `validate` runs.
Models, schemes and estimators keep their dataclasses with their code, in their registries.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnn_train.binarize import SCHEMES, STES
from bnn_train.data.schemas import DATA_SCHEMAS
from bnn_train.errors import ConfigError, FieldError, format_value, one_of, require
from bnn_train.models import MODELS, has_per_conv_shortcut
from bnn_train.train.distill import TEACHER_SCHEMAS
from bnn_train.train.optim import OPTIM_SCHEMAS, SCHED_SCHEMAS
from bnn_train.train.schemas import PRETRAIN_SCHEMAS, TrainerConfig

__all__ = ["GROUPS", "schemas", "validate", "flatten", "format_value", "unknown_key_error", "describe_node"]


@dataclass
class TopLevelConfig:
    """Keys of configs/train.yaml itself."""

    seed: int = 0
    device: str = "auto"
    ckpt_path: Optional[str] = None
    loss: str = "cross_entropy"

    def __post_init__(self):
        require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2^63)")
        one_of(self, "device", "auto", "cpu", "cuda")
        one_of(self, "loss", "cross_entropy", "squared_hinge")


@dataclass
class TrainConfig(TopLevelConfig):
    """The schema of configs/train.yaml: typed top-level keys, and the group nodes (each typed by its own
    option's schema)."""

    data: Any = None
    ste: Any = None
    model: Any = None
    method: Any = None
    pretrain: Any = None
    teacher: Any = None
    optim: Any = None
    sched: Any = None
    trainer: Any = None


# registry: group -> option -> schema ------------------------------------------------------------

GROUPS = ("data", "model", "method", "ste", "pretrain", "teacher", "optim", "sched", "trainer")
_STATIC = {
    "data": DATA_SCHEMAS,
    "optim": OPTIM_SCHEMAS,
    "sched": SCHED_SCHEMAS,
    "pretrain": PRETRAIN_SCHEMAS,
    "teacher": TEACHER_SCHEMAS,
    "trainer": {"default": TrainerConfig},
}


def schemas(group: str) -> dict[str, type]:
    """option -> dataclass of one group (models, schemes and estimators from their registries)."""
    return {"model": MODELS.schemas, "method": SCHEMES.schemas, "ste": STES.schemas}.get(group) or _STATIC[group]


def register_schemas() -> None:
    """Store every schema as `schema/GROUP/OPTION` in Hydra's ConfigStore (the YAMLs' defaults name them)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainConfig)
    for group in GROUPS:
        for option, schema in schemas(group).items():
            store.store(group=f"schema/{group}", name=option, node=schema)


register_schemas()
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)  # configs/train.yaml: two runs in one second


# checking a composed config ---------------------------------------------------------------------


def validate(cfg: DictConfig | Mapping, pairs: bool = True) -> None:
    """Run every node's schema checks on a composed config; raise a one-line ConfigError naming the key.

    pairs: also reject model x method combinations that cannot work."""
    if isinstance(cfg, DictConfig) and "hydra" in cfg:  # compose(return_hydra_config=True): not ours to check
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    root = _resolve(cfg)
    nodes = {group: root.pop(group, None) for group in GROUPS}
    _instantiate(TopLevelConfig, {k: v for k, v in root.items() if k != "experiment"}, "")
    for group, node in nodes.items():
        if node is None:
            raise ConfigError(f"{group}: missing; pick one with {group}=OPTION")
        if not isinstance(node, Mapping):
            raise ConfigError(f"{group}={format_value(node)}: must be a config node; use {group}=OPTION")
        options = schemas(group)
        name = node.get("name", "default")
        if name not in options:
            raise ConfigError(f"{group}.name={format_value(name)}: no such option; choose one of: {', '.join(options)}")
        _instantiate(options[name], node, group)
    if pairs and SCHEMES[nodes["method"]["name"]].needs_per_conv_shortcut and not has_per_conv_shortcut(nodes["model"]):
        method, model = nodes["method"]["name"], nodes["model"]["name"]
        raise ConfigError(f"method={method} model={model}: {method} puts its activations around a real shortcut of "
                          f"every conv; use model=bireal18, bireal34 or a ResNet with model.shortcut=per_conv")


def _instantiate(schema: type, node: Mapping, path: str) -> Any:
    names = [f.name for f in fields(schema)]
    for key in node:
        if key not in names:
            setting = f"{path}.{key}" if path else key
            raise unknown_key_error(f"{setting}={format_value(node[key])}", describe_node(path, node), key, names)
    missing = [k for k in names if k not in node and k != "name"]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: missing (the {schema.__name__} schema needs it)")
    for key, value in node.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}.{key}={value}: must be finite" if path else f"{key}={value}: must be finite")
    try:
        return schema(**node)
    except FieldError as err:
        raise err.at(path) from None
    except TypeError as err:  # a value of the wrong type reached a range check
        raise ConfigError(f"{path}: {err}") from None


def flatten(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """{"optim.lr": 0.001, "optim.betas": "[0.9, 0.999]", ...}: dotted keys, scalar values (lists as
    JSON, null as "null"), for SummaryWriter.add_hparams and metrics.json."""
    out: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (list, tuple)) or value is None:
                out[f"{prefix}{key}"] = json.dumps(value)
            else:
                out[f"{prefix}{key}"] = value

    walk(_resolve(cfg), "")
    return out


def unknown_key_error(setting: str, where: str, key: str, valid: Iterable[str]) -> ConfigError:
    """`optim.lrr=0.1: optim (adam) has no key 'lrr' (did you mean 'lr'?); valid keys: ...`."""
    valid = [str(k) for k in valid]
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{setting}: {where} has no key '{key}'{hint}; valid keys: {', '.join(valid)}")


def describe_node(path: str, node: Any) -> str:
    """'the config' for the root, 'optim (adam)' for a group node with a name, else the path."""
    if not path:
        return "the config"
    name = node.get("name") if isinstance(node, Mapping) else None
    return f"{path} ({name})" if isinstance(name, str) and path in GROUPS else path


def _resolve(cfg: DictConfig | Mapping) -> dict:
    """Plain dict with interpolations resolved; resolution failures become one-line errors."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{getattr(err, 'full_key', None) or '<config>'}: {first_line}") from None
