"""Typed schemas for every config group, `validate()` for a composed config, and `flatten()`.

YAML picks values; the dataclasses below say which keys each group option has, their types and
their allowed ranges. `SCHEMAS` maps group -> option `name` -> dataclass, so a new option is one
registry line (plus a dataclass when its keys differ from an existing one):

    @dataclass
    class BiRealConfig(MethodConfig): ...          # only when the keys differ
    SCHEMAS["method"]["bireal"] = BiRealConfig     # or add the line to the dict literal

Every problem raises `ConfigError` with one line naming the full key, the bad value and what is
allowed, e.g. ``optim.lr=-1: must be > 0``. The schemas use only types that
`OmegaConf.structured` accepts, so they can also back a ConfigStore later.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnn_train.errors import ConfigError

__all__ = [
    "SCHEMAS",
    "TopLevelConfig",
    "validate",
    "flatten",
    "schema_for",
    "format_value",
    "unknown_key_error",
    "describe_node",
]


# --------------------------------------------------------------------------------------------
# Field constraints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A constraint on a (type-checked, non-null) value and the text shown when it fails."""

    ok: Callable[[Any], bool]
    text: str


def gt(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"must be > {lo}")


def ge(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f"must be >= {lo}")


def in_range(lo: float, hi: float, *, hi_closed: bool = False) -> Rule:
    if hi_closed:
        return Rule(lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")
    return Rule(lambda v: lo <= v < hi, f"must be in [{lo}, {hi})")


def each(rule: Rule) -> Rule:
    """Apply `rule` to every element of a list."""
    return Rule(lambda v: all(rule.ok(x) for x in v), "every value " + rule.text)


def length(n: int) -> Rule:
    return Rule(lambda v: len(v) == n, f"must have {n} values")


INCREASING = Rule(lambda v: all(a < b for a, b in zip(v, v[1:])), "must be increasing")


def spec(default: Any, *rules: Rule) -> Any:
    """A schema field: its default (as in the YAML) and the rules its value must meet."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rules": rules})
    return field(default=default, metadata={"rules": rules})


def choice(default: str, *options: str) -> Any:
    """A field whose value must be one of `options`; YAML's true/false match 'true'/'false'."""
    return field(default=default, metadata={"choices": options})


ACTS = ("auto", "relu", "hardtanh", "identity", "rprelu")
AUTO_BOOL = ("auto", "true", "false")  # true/false arrive as bools from YAML and the command line


# --------------------------------------------------------------------------------------------
# Schemas: one dataclass per distinct set of keys
# --------------------------------------------------------------------------------------------


@dataclass
class TopLevelConfig:
    """Keys of configs/train.yaml itself (the groups are checked by SCHEMAS)."""

    seed: int = spec(0, ge(0))
    device: str = choice("auto", "auto", "cpu", "cuda")
    ckpt_path: Optional[str] = None
    loss: str = choice("cross_entropy", "cross_entropy", "squared_hinge")


# data ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Datasets with a fixed image size: cifar10, mnist, digits."""

    name: str
    root: str = "data"
    batch_size: int = spec(128, ge(1))
    num_workers: int = spec(0, ge(0))
    download: bool = False
    augment: bool = False


@dataclass
class Cifar10Config(DataConfig):
    cache_dir: str = "data/.cache"


@dataclass
class SyntheticDataConfig(DataConfig):
    num_classes: int = spec(10, ge(2))
    channels: int = spec(3, ge(1))
    image_size: int = spec(16, ge(1))
    train_size: int = spec(1024, ge(1))
    val_size: int = spec(256, ge(1))
    noise: float = spec(0.5, ge(0))


@dataclass
class ImageFolderConfig(DataConfig):
    image_size: int = spec(32, ge(1))
    in_memory: Any = choice("auto", *AUTO_BOOL)
    max_memory_gb: float = spec(4.0, gt(0))
    cache_dir: str = "data/.cache"


# model ---------------------------------------------------------------------------------------


@dataclass
class MLPConfig:
    name: str = "mlp"
    depth: int = spec(3, ge(0))  # 0: a linear classifier
    width: int = spec(1024, ge(1))
    width_mult: float = spec(1.0, gt(0))
    act: str = choice("auto", *ACTS)
    dropout: float = spec(0.0, in_range(0, 1))
    final_bn: bool = True


@dataclass
class ResNet20Config:
    name: str = "resnet20"
    width_mult: float = spec(1.0, gt(0))
    act: str = choice("auto", *ACTS)
    shortcut: str = choice("block", "block", "per_conv")
    downsample: str = choice("conv", "conv", "option_a")
    head_bn: bool = False


@dataclass
class ResNet18Config(ResNet20Config):
    name: str = "resnet18"
    stem: str = choice("auto", "auto", "imagenet", "cifar")


@dataclass
class AlexNetConfig:
    name: str = "alexnet"
    variant: str = choice("auto", "auto", "imagenet", "cifar")
    block_order: str = choice("standard", "standard", "xnor")
    fc_width: Any = spec("auto", Rule(lambda v: v == "auto" or (type(v) is int and v >= 1),
                                      "must be auto or an integer >= 1"))
    width_mult: float = spec(1.0, gt(0))
    act: str = choice("auto", *ACTS)


@dataclass
class BiRealConfig:
    name: str = "bireal18"
    stem: str = choice("auto", "auto", "imagenet", "cifar")
    width_mult: float = spec(1.0, gt(0))
    act: str = choice("auto", *ACTS)
    shortcut: bool = True


# method, ste, pretrain, teacher --------------------------------------------------------------


@dataclass
class MethodConfig:
    """Binarization schemes that differ only in behaviour (the binarize/ registry), not keys."""

    name: str
    keep_first_real: bool = False
    keep_last_real: bool = False
    keep_downsample_real: bool = False
    clip_latent: Optional[float] = spec(1.0, gt(0))  # null: no latent-weight clip


@dataclass
class BinaryMethodConfig(MethodConfig):
    """Keys every binarizing method has (the literature's training switches, `binarize_`)."""

    weight_scale: str = choice("none", "none", "mean_abs", "learnable")
    weight_scale_granularity: str = choice("channel", "channel", "layer")
    affine_output: bool = False
    act_levels: str = choice("pm1", "pm1", "01")
    act_stochastic: bool = False
    reg: str = choice("none", "none", "l1", "l2")
    reg_weight: float = spec(0.01, ge(0))

    def cross_check(self) -> Optional[tuple[str, str]]:
        if self.act_stochastic and self.name in ("binaryconnect", "bwn"):
            return "act_stochastic", f"{self.name} keeps activations real; act_stochastic applies to binary activations"
        if self.act_levels != "pm1" and self.name in ("binaryconnect", "bwn"):
            return "act_levels", f"{self.name} keeps activations real; act_levels applies to binary activations"
        return None


@dataclass
class XnorConfig(BinaryMethodConfig):
    act_scale: str = choice("k_map", "none", "k_map")


@dataclass
class BinaryConnectConfig(BinaryMethodConfig):
    stochastic: bool = False


@dataclass
class BiRealMethodConfig(BinaryMethodConfig):
    magnitude_aware: bool = True


@dataclass
class SwishSignConfig:
    name: str = "swish_sign"
    beta: float = spec(5.0, gt(0))


@dataclass
class EDEConfig:
    name: str = "ede"
    t_min: float = spec(0.001, gt(0))
    t_max: float = spec(10.0, gt(0))

    def cross_check(self) -> Optional[tuple[str, str]]:
        if self.t_min > self.t_max:
            return "t_min", f"must be <= ste.t_max ({self.t_max})"
        return None


@dataclass
class PretrainConfig:
    name: str = "clip"
    epochs: int = spec(10, ge(0))
    lr: Optional[float] = spec(None, gt(0))  # null: the run's optim.lr
    checkpoint: Optional[str] = None


@dataclass
class TeacherConfig:
    """teacher=checkpoint: a frozen teacher for knowledge distillation (bnn_train/train/distill.py)."""

    name: str = "checkpoint"
    path: str = "???"  # required: teacher.path=PATH (a bnn-train checkpoint or a state dict)
    model: Optional[str] = None  # plain state dicts only: a registered architecture name
    loss: str = choice("kd", "kd", "distribution")
    temperature: float = spec(4.0, gt(0))
    alpha: float = spec(0.9, in_range(0, 1, hi_closed=True))

    def cross_check(self) -> Optional[tuple[str, str]]:
        if self.model is not None and self.model not in SCHEMAS["model"]:
            return "model", "choose one of " + ", ".join(SCHEMAS["model"]) + " (or null for a bnn-train checkpoint)"
        return None


@dataclass
class NameOnlyConfig:
    """Options without parameters (ste: identity/clipped, pretrain: none, teacher: none)."""

    name: str


# optim ---------------------------------------------------------------------------------------


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = spec(0.001, gt(0))
    betas: List[float] = spec([0.9, 0.999], length(2), each(in_range(0, 1)))
    weight_decay: float = spec(0.0, ge(0))
    decay_binary: bool = False
    latent_lr_scale: str = choice("none", "none", "glorot")


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = spec(0.1, gt(0))
    momentum: float = spec(0.9, in_range(0, 1))
    nesterov: bool = False
    weight_decay: float = spec(0.0005, ge(0))
    decay_binary: bool = False
    latent_lr_scale: str = choice("none", "none", "glorot")

    def cross_check(self) -> Optional[tuple[str, str]]:
        # torch.optim.SGD raises on this only when the optimizer is built, after data loading.
        if self.nesterov and self.momentum == 0:
            return "nesterov", "needs optim.momentum > 0"
        return None


# sched ---------------------------------------------------------------------------------------


@dataclass
class ConstantConfig:
    name: str = "constant"
    warmup_epochs: int = spec(0, ge(0))


@dataclass
class CosineConfig(ConstantConfig):
    name: str = "cosine"
    min_lr_ratio: float = spec(0.0, in_range(0, 1, hi_closed=True))


@dataclass
class StepConfig(ConstantConfig):
    name: str = "step"
    milestones: List[int] = spec([30, 60, 90], each(ge(1)), INCREASING)
    gamma: float = spec(0.1, gt(0))


# trainer -------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    epochs: int = spec(20, ge(0))
    limit_train_batches: Optional[int] = spec(None, ge(1))  # null: all batches
    limit_val_batches: Optional[int] = spec(None, ge(1))
    precision: str = choice("fp32", "fp32", "bf16")
    log_every_n_steps: int = spec(20, ge(1))
    hist_every_n_epochs: int = spec(5, ge(1))
    progress: Any = choice("auto", *AUTO_BOOL)
    resume: Any = choice(False, *AUTO_BOOL)  # auto: continue when checkpoints/last.pt exists
    checkpoint: bool = True
    ckpt_every_n_steps: Optional[int] = spec(None, ge(1))
    skip_nonfinite: int = spec(0, ge(0))
    deterministic: bool = False
    binary_precision: str = choice("auto", "auto", "fp32", "bf16", "int8")
    binary_backward: str = choice("bf16", "fp32", "bf16")
    channels_last: bool = True
    compile: bool = False
    keep_cpu_memory: bool = True


# registry: group -> option `name` -> schema. Nodes without a `name` key use "default".
SCHEMAS: dict[str, dict[str, type]] = {
    "data": {
        "cifar10": Cifar10Config,
        "mnist": DataConfig,
        "digits": DataConfig,
        "synthetic": SyntheticDataConfig,
        "imagefolder": ImageFolderConfig,
    },
    "model": {"mlp": MLPConfig, "resnet18": ResNet18Config, "resnet20": ResNet20Config,
              "alexnet": AlexNetConfig, "bireal18": BiRealConfig, "bireal34": BiRealConfig},
    "method": {
        "fp": MethodConfig,
        "binaryconnect": BinaryConnectConfig,
        "bnn": BinaryMethodConfig,
        "bwn": BinaryMethodConfig,
        "xnor": XnorConfig,
        "bireal": BiRealMethodConfig,
        "reactnet": BiRealMethodConfig,
        "irnet": MethodConfig,
    },
    "ste": {"identity": NameOnlyConfig, "clipped": NameOnlyConfig, "approx_sign": NameOnlyConfig,
            "swish_sign": SwishSignConfig, "ede": EDEConfig},
    "pretrain": {"none": PretrainConfig, "relu": PretrainConfig, "clip": PretrainConfig,
                 "binary_act": PretrainConfig},
    "teacher": {"none": NameOnlyConfig, "checkpoint": TeacherConfig},
    "optim": {"adam": AdamConfig, "sgd": SGDConfig},
    "sched": {"constant": ConstantConfig, "cosine": CosineConfig, "step": StepConfig},
    "trainer": {"default": TrainerConfig},
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def validate(cfg: DictConfig | Mapping, pairs: bool = True) -> None:
    """Check a composed config (what @hydra.main passes in); raise a one-line ConfigError.

    pairs: also reject model x method combinations that cannot work (`check_combination`).
    """
    root = _resolve(cfg)
    root.pop("hydra", None)  # present only with compose(return_hydra_config=True)
    groups = {group: root.pop(group, _ABSENT) for group in SCHEMAS}
    _check_node(root, TopLevelConfig, "", extra_keys=list(SCHEMAS))
    for group, node in groups.items():
        if node is _ABSENT:
            raise ConfigError(f"{group}: missing; pick one with {group}=OPTION")
        _check_node(node, schema_for(group, node), group)
    if pairs:
        check_combination(groups["model"], groups["method"])


def check_combination(model: Mapping, method: Mapping) -> None:
    """Model x method pairs that cannot work, rejected before any data is loaded."""
    from bnn_train.binarize.schemes import get_scheme  # torch loads only when the names are valid
    from bnn_train.models import has_per_conv_shortcut

    if get_scheme(method["name"]).needs_per_conv_shortcut and not has_per_conv_shortcut(model):
        raise ConfigError(f"method={method['name']} model={model['name']}: {method['name']} puts RPReLU and "
                          f"RSign around a real shortcut of every conv; use model=bireal18 or model=bireal34 "
                          f"(with model.shortcut=true)")


def schema_for(group: str, node: Any) -> type:
    """The dataclass for a group node, picked by its `name` key ("default" when it has none)."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{group}={format_value(node)}: must be a config node; use {group}=OPTION")
    options = SCHEMAS[group]
    if "name" not in node and "default" in options:
        return options["default"]
    name = node.get("name")
    if not isinstance(name, str) or name not in options:
        raise ConfigError(
            f"{group}.name={format_value(name)}: no schema for it; known: {', '.join(options)}"
            " (register new options in SCHEMAS, bnn_train/config.py)"
        )
    return options[name]


def flatten(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """{"optim.lr": 0.001, "optim.betas": "[0.9, 0.999]", ...}: dotted keys, scalar values.

    Lists become JSON strings and null becomes "null", so the result goes straight into
    SummaryWriter.add_hparams (which takes only int/float/str/bool) and metrics.json.
    """
    out: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, path + ".")
            elif isinstance(value, (list, tuple)) or value is None:
                out[path] = json.dumps(value)
            else:
                out[path] = value

    walk(_resolve(cfg), "")
    return out


def format_value(value: Any, limit: int = 60) -> str:
    """A value as the user would type it: strings quoted, null/true/false, lists in brackets."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {format_value(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)  # quotes strings and escapes newlines, so the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    return f"{path} ({name})" if isinstance(name, str) and path in SCHEMAS else path


# --------------------------------------------------------------------------------------------
# Checking one node
# --------------------------------------------------------------------------------------------

_ABSENT = object()

_TYPES: dict[type, tuple[Callable[[Any], bool], str, str]] = {
    # type: (accepts, "must be ...", "must be a list of ...")
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "integers"),
    float: (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "a number",
        "finite numbers",
    ),
    bool: (lambda v: isinstance(v, bool), "true or false", "booleans"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
}


def _check_node(node: Mapping, schema: type, path: str, extra_keys: Iterable[str] = ()) -> None:
    """Unknown keys, missing keys, then each value's type, rules and the schema's cross check."""
    specs = {f.name: f for f in fields(schema)}
    valid = [*specs, *extra_keys]
    for key, value in node.items():
        if key not in specs:
            raise unknown_key_error(
                f"{_join(path, key)}={format_value(value)}", describe_node(path, node), key, valid
            )
    hints = _hints(schema)
    for name, spec_ in specs.items():
        if name not in node:
            raise ConfigError(f"{_join(path, name)}: missing (the {schema.__name__} schema needs it)")
        _check_value(_join(path, name), node[name], hints[name], spec_.metadata)
    cross_check = getattr(schema, "cross_check", None)
    if cross_check is not None:
        problem = cross_check(schema(**{k: node[k] for k in specs}))
        if problem is not None:
            key, text = problem
            raise ConfigError(f"{_join(path, key)}={format_value(node[key])}: {text}")


def _check_value(key: str, value: Any, hint: Any, meta: Mapping) -> None:
    options = meta.get("choices")
    if options is not None:  # the options say everything: no separate type check
        if _as_choice(value) not in options:
            raise _bad(key, value, "choose one of " + ", ".join(options))
        return
    problem = _type_problem(value, hint)
    if problem:
        raise _bad(key, value, problem)
    if value is None:
        return  # Optional fields: rules apply only to set values
    for rule in meta.get("rules", ()):
        if not rule.ok(value):
            raise _bad(key, value, rule.text)


def _type_problem(value: Any, hint: Any) -> Optional[str]:
    """None when `value` fits the annotation, else 'must be ...'."""
    if hint is Any:
        return None
    if get_origin(hint) is Union:  # Optional[X]
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        problem = None if value is None else _type_problem(value, inner)
        return problem and f"{problem} or null"
    if get_origin(hint) in (list, List):
        (inner,) = get_args(hint)
        accepts, _, plural = _TYPES[inner]
        if not isinstance(value, list) or not all(accepts(v) for v in value):
            return f"must be a list of {plural}"
        return None
    accepts, noun, _ = _TYPES[hint]
    if accepts(value):
        return None
    if hint is float and isinstance(value, float):
        return "must be finite"  # nan or inf
    return f"must be {noun}"


def _as_choice(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else None


def _bad(key: str, value: Any, text: str) -> ConfigError:
    return ConfigError(f"{key}={format_value(value)}: {text}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


@lru_cache(maxsize=None)
def _hints(schema: type) -> dict[str, Any]:
    return get_type_hints(schema)


def _resolve(cfg: DictConfig | Mapping) -> dict:
    """Plain dict with interpolations resolved; resolution failures become one-line errors."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{getattr(err, 'full_key', None) or '<config>'}: {first_line}") from None

