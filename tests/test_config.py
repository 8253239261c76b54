"""Config schemas, validate(), flatten(), preflight(), run_cli() and report_user_errors()."""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from bnn_train.cli import preflight, report_user_errors, run_cli
from bnn_train.config import flatten, schemas, validate
from bnn_train.errors import ConfigError, DataError, TrainingError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# (group, option) for every YAML under configs/<group>/: new options are covered automatically.
OPTIONS = sorted(
    (p.parent.relative_to(CONFIG_DIR).as_posix(), p.stem)
    for p in CONFIG_DIR.rglob("*.yaml")
    if p.parent != CONFIG_DIR
)
GROUPS = sorted({p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*") if p.is_dir()})


@functools.lru_cache(maxsize=None)
def _compose_cached(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def composed(*overrides: str) -> DictConfig:
    """A fresh copy of the composed config (composing costs ~0.1 s, so it is cached)."""
    return copy.deepcopy(_compose_cached(overrides))


def validate_command_line(argv: list[str]) -> None:
    """What train.py checks before any job: compose the command line, then validate()."""
    preflight(argv, CONFIG_DIR)


def assert_one_line_error(exc_info: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, repr(message)
    assert "HYDRA_FULL_ERROR" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------------------------
# Every option composes and validates; schemas fit OmegaConf
# --------------------------------------------------------------------------------------------


# Options that only work with a particular choice in another group.
COMPANIONS = {("method", "reactnet"): ["model=bireal18"], ("teacher", "checkpoint"): ["teacher.path=/tmp/t.pt"]}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    validate(composed(f"{group}={option}", *COMPANIONS.get((group, option), [])))


def test_method_that_needs_per_conv_shortcuts_is_rejected_elsewhere() -> None:
    with pytest.raises(ConfigError, match="method=reactnet model=resnet20: .*use model=bireal18"):
        validate(composed("method=reactnet", "model=resnet20"))
    with pytest.raises(ConfigError, match="method=reactnet model=bireal18"):
        validate(composed("method=reactnet", "model=bireal18", "model.shortcut=false"))
    validate(composed("method=reactnet", "model=resnet20", "model.shortcut=per_conv"))


def test_default_config_passes_preflight() -> None:
    preflight([], CONFIG_DIR)


@pytest.mark.parametrize(("group", "option"), [o for o in OPTIONS if o[0] != "experiment"],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g != "experiment"])
def test_every_yaml_default_equals_its_schema_default(group: str, option: str) -> None:
    """One default per key: the keys a YAML lists (for the option table) repeat its schema's defaults."""
    raw = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    node = raw[group] if group in raw and "@package _global_" in (CONFIG_DIR / group / f"{option}.yaml").read_text() \
        else raw
    yaml_keys = {k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"}
    schema = schemas(group)[option]
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    assert f"/schema/{group}/{option}@" in (CONFIG_DIR / group / f"{option}.yaml").read_text()
    assert yaml_keys.get("name", option) == option
    assert {k: v for k, v in yaml_keys.items() if k != "name"} == {k: defaults[k] for k in yaml_keys if k != "name"}


def test_composed_nodes_are_typed_by_their_schema() -> None:
    cfg = composed("method=xnor", "optim=sgd")
    assert OmegaConf.get_type(cfg.method) is schemas("method")["xnor"]
    assert OmegaConf.get_type(cfg.optim) is schemas("optim")["sgd"]
    with pytest.raises(Exception, match="lrr"):
        cfg.optim.lrr = 0.1  # the schema is closed


# --------------------------------------------------------------------------------------------
# Bad values: one line naming the key
# --------------------------------------------------------------------------------------------

BAD = [
    # (command line, key the message must name)
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim=sgd", "optim.momentum=1.0"], "optim.momentum"),
    (["optim=sgd", "optim.momentum=-0.1"], "optim.momentum"),
    (["optim=sgd", "optim.nesterov=true", "optim.momentum=0"], "optim.nesterov"),
    (["trainer.epochs=1.5"], "trainer.epochs"),
    (["trainer.epochs=-1"], "trainer.epochs"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.epochs=true"], "trainer.epochs"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    (["trainer.limit_val_batches=-3"], "trainer.limit_val_batches"),
    (["trainer.precision=fp16"], "trainer.precision"),
    (["trainer.progress=maybe"], "trainer.progress"),
    (["trainer.resume=1"], "trainer.resume"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data=imagefolder", "data.image_size=0"], "data.image_size"),
    (["data=imagefolder", "data.in_memory=sometimes"], "data.in_memory"),
    (["data=synthetic", "data.num_classes=1"], "data.num_classes"),
    (["method.clip_latent=0"], "method.clip_latent"),
    (["method.clip_latent=-0.5"], "method.clip_latent"),
    (["method.keep_first_real=maybe"], "method.keep_first_real"),
    (["model.act=tanh"], "model.act"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model=resnet18", "model.stem=big"], "model.stem"),
    (["model.name=vgg"], "model.name"),
    (["sched=step", "sched.gamma=0"], "sched.gamma"),
    (["sched=step", "sched.milestones=[60,30]"], "sched.milestones"),
    (["sched.warmup_epochs=-1"], "sched.warmup_epochs"),
    (["device=tpu"], "device"),
    (["seed=abc"], "seed"),
    (["data.root=${oc.env:BNN_SURELY_UNSET_VAR}"], "data.root"),
]


@pytest.mark.parametrize(("argv", "key"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_gives_one_line_naming_the_key(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        validate_command_line(argv)
    assert_one_line_error(exc_info, key)


def test_bad_values_also_fail_in_preflight() -> None:
    for argv, key in BAD[::6]:  # the same path end to end (each call composes: ~0.1 s)
        with pytest.raises(ConfigError) as exc_info:
            preflight(argv, CONFIG_DIR)
        assert_one_line_error(exc_info, key)


def test_exact_messages() -> None:
    expected = {
        "optim.lr=-1": "optim.lr=-1.0: must be > 0",
        "model.act=tanh": "model.act='tanh': choose one of auto, relu, hardtanh, identity, rprelu",
        "trainer.epochs=abc": "trainer.epochs='abc': must be an integer",
        "model=nonexistent": "model=nonexistent: unknown option; choose one of: alexnet, bireal18, bireal34, mlp, resnet18, resnet20",
    }
    for override, message in expected.items():
        with pytest.raises(ConfigError) as exc_info:
            preflight([override], CONFIG_DIR)
        assert str(exc_info.value) == message


def test_unknown_key_in_group_node_is_rejected_by_validate() -> None:
    cfg = OmegaConf.to_container(composed())  # an untyped config, as a script might build one
    cfg["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError) as exc_info:
        validate(cfg)
    assert_one_line_error(exc_info, "optim.lrr", "'lr'", "weight_decay")


def test_missing_key_and_missing_group_are_rejected() -> None:
    cfg = OmegaConf.to_container(composed())
    del cfg["trainer"]["epochs"]
    with pytest.raises(ConfigError) as exc_info:
        validate(cfg)
    assert_one_line_error(exc_info, "trainer.epochs", "missing")

    cfg = OmegaConf.to_container(composed())
    del cfg["model"]
    with pytest.raises(ConfigError) as exc_info:
        validate(cfg)
    assert_one_line_error(exc_info, "model", "missing")


def test_nullable_and_bool_like_values_pass() -> None:
    cfg = composed("method=fp", "trainer.progress=true", "trainer.limit_train_batches=3")
    validate(cfg)
    cfg.trainer.progress = False
    cfg.trainer.limit_val_batches = None
    validate(cfg)


# --------------------------------------------------------------------------------------------
# check_overrides: options, keys, sweeps, pass-through
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["model=nonexistent"], ["model=nonexistent", "unknown option", "mlp, resnet18, resnet20"]),
        (["-m", "method=fp,bogus"], ["method=bogus", "unknown option", "xnor"]),
        (["--multirun", "method=glob(zz*)"], ["method=glob(zz*)", "matches no option"]),
        (["experiment=no_such_recipe"], ["experiment=no_such_recipe", "unknown option"]),
        (["experiment=null"], ["experiment=null", "~experiment"]),
        (["optim.lrr=0.1"], ["optim.lrr=0.1", "no key 'lrr'", "did you mean 'lr'", "weight_decay"]),
        (["modle=mlp"], ["modle=mlp", "no key 'modle'", "'model'"]),
        (["model=resnet20", "model.depth=4"], ["model.depth=4", "model (resnet20)", "act"]),
        (["-m", "model=mlp,resnet18", "model.depth=4"], ["model.depth=4", "model (resnet18)"]),
        (["-m", "optim.lr=0.1,-1"], ["optim.lr=-1", "> 0"]),
        (["-m", "seed=0,1", "trainer.epochs=5,abc"], ["trainer.epochs='abc'"]),
        (["method=fp,bnn"], ["method=fp,bnn", "-m"]),
        (["optim.lr=["], ["optim.lr=[", "cannot parse"]),
        (["+optim.extra=1"], ["optim.extra=1", "no key 'extra'"]),
        (["+experiment=no_such_recipe"], ["experiment=no_such_recipe", "unknown option"]),
    ],
)
def test_check_overrides_errors(argv: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as exc_info:
        preflight(argv, CONFIG_DIR)
    assert_one_line_error(exc_info, *fragments)
    assert not GlobalHydra.instance().is_initialized()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["optim.lr=1", "trainer.epochs=0", "seed=3"],
        ["method=fp", "trainer.progress=true", "trainer.limit_val_batches=null"],
        ["model=resnet18", "model.stem=cifar", "data=mnist", "device=cpu"],
        ["data=imagefolder", "data.in_memory=false", "data.root=/tmp/images"],
        ["optim=sgd", "optim.nesterov=true", "sched=step", "sched.milestones=[10,20]"],
        ["optim.betas.0=0.5", "ckpt_path=outputs/last.pt", "++seed=4"],
        ["-m", "method=binaryconnect,bwn,xnor,bnn", "seed=0,1,2"],
        ["-m", "method=glob(b*)", "optim.lr=0.1,0.01", "optim.weight_decay=0,1e-4"],
        ["-m", "seed=range(0,3)", "model=mlp,resnet20"],
        ["hydra.run.dir=outputs/x", "hydra.job.chdir=false", "hydra/job_logging=disabled"],
        ["--cfg", "job", "optim.lr=-1"],  # --cfg only prints: bad values may be inspected
        ["-c", "job", "--resolve"],
        ["--help", "model=nonexistent"],  # help is Hydra's business
        ["--hydra-help"],
    ],
)
def test_good_command_lines_pass(argv: list[str]) -> None:
    preflight(argv, CONFIG_DIR)
    assert not GlobalHydra.instance().is_initialized()


# --------------------------------------------------------------------------------------------
# flatten
# --------------------------------------------------------------------------------------------


def test_flatten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNN_DATA_ROOT", "/datasets")
    flat = flatten(composed("method=fp"))
    assert flat["optim.lr"] == 0.001
    assert flat["optim.betas"] == "[0.9, 0.999]"
    assert flat["method.clip_latent"] == "null"
    assert flat["data.root"] == "/datasets"  # interpolations resolved
    assert flat["seed"] == 0 and flat["model.name"] == "mlp"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())


# --------------------------------------------------------------------------------------------
# run_cli + report_user_errors: one line on stderr, the error's exit code; HYDRA_FULL_ERROR=1
# --------------------------------------------------------------------------------------------


def _raise(err: Exception) -> None:
    raise err


def test_run_cli_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: _raise(DataError("no MNIST under data/")))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no MNIST under data/\n"
    assert "HYDRA_FULL_ERROR" not in os.environ  # Hydra's own errors keep their short form


def test_run_cli_reraises_with_hydra_full_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        run_cli(lambda: _raise(ConfigError("optim.lr=-1: must be > 0")))


def test_report_user_errors_outside_hydra(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = report_user_errors(lambda cfg: _raise(DataError("no images under data/train")))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        task(None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no images under data/train\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError):
        task(None)


def _hydra_main(ran: list[int]):
    """A train.py-like task: seed 1 diverges, seed 5 has a bad config."""

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    @report_user_errors
    def main(cfg: DictConfig) -> float:
        ran.append(cfg.seed)
        if cfg.seed == 5:
            raise ConfigError(f"seed={cfg.seed}: test failure")
        if cfg.seed == 1:
            raise TrainingError("non-finite loss at step 3")
        return 0.5

    return main


def _run_train(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[int]]:
    """Run `train.py ARGV` in-process the way train.py does; (exit code, seeds that ran)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    quiet = [f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}", "hydra.output_subdir=null",
             "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, *quiet])
    ran: list[int] = []
    main = _hydra_main(ran)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: (preflight(sys.argv[1:], CONFIG_DIR), main()))
    return exit_info.value.code, ran


def test_error_inside_a_hydra_job_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, ran = _run_train(["seed=1"], tmp_path, monkeypatch)
    assert (code, ran) == (TrainingError.exit_code, [1])
    assert capsys.readouterr().err == "error: non-finite loss at step 3\n"

    code, _ = _run_train(["seed=5"], tmp_path, monkeypatch)
    assert code == 2
    assert capsys.readouterr().err == "error: seed=5: test failure\n"


def test_failed_sweep_job_lets_the_others_run_then_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, ran = _run_train(["-m", "seed=0,1,2"], tmp_path, monkeypatch)
    assert (code, ran) == (TrainingError.exit_code, [0, 1, 2])
    assert capsys.readouterr().err.splitlines()[-1] == "error: non-finite loss at step 3"


def test_bad_sweep_value_stops_before_any_job(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, ran = _run_train(["-m", "seed=0,2", "optim.lr=0.1,-1"], tmp_path, monkeypatch)
    assert (code, ran) == (2, [])
    assert capsys.readouterr().err == "error: optim.lr=-1.0: must be > 0\n"


# --------------------------------------------------------------------------------------------
# Property test: generated bad overrides all give one-line ConfigErrors
# --------------------------------------------------------------------------------------------

NUMERIC_KEYS = [
    "optim.lr", "optim.weight_decay", "trainer.epochs", "trainer.log_every_n_steps",
    "data.batch_size", "data.num_workers", "sched.warmup_epochs", "model.depth", "seed",
]  # fmt: skip
ENUM_KEYS = {  # key -> (group choices it needs, allowed values)
    "model.act": ((), {"auto", "relu", "hardtanh", "identity"}),
    "model.stem": (("model=resnet18",), {"auto", "imagenet", "cifar"}),
    "trainer.precision": ((), {"fp32", "bf16"}),
    "trainer.progress": ((), {"auto", "true", "false"}),
    "data.in_memory": (("data=imagefolder",), {"auto", "true", "false"}),
    "device": ((), {"auto", "cpu", "cuda"}),
}
GROUP_OPTIONS = {group: {o for g, o in OPTIONS if g == group} for group in GROUPS}

words = st.from_regex(r"[a-z][a-z0-9_]{0,9}", fullmatch=True).filter(lambda w: w != "null")
non_positive = st.one_of(
    st.integers(max_value=0),
    st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
)


@st.composite
def bad_command_lines(draw: st.DrawFn) -> tuple[tuple[str, ...], str, str]:
    """(group choices, bad override, fragment the message must contain)."""
    kind = draw(st.sampled_from(["lr", "text", "epochs", "enum", "option"]))
    if kind == "lr":
        value = draw(non_positive)
        return (), f"optim.lr={value!r}", "optim.lr"
    if kind == "text":
        key = draw(st.sampled_from(NUMERIC_KEYS))
        return (), f"{key}={draw(words)}", key
    if kind == "epochs":
        return (), f"trainer.epochs={draw(st.integers(max_value=-1))}", "trainer.epochs"
    if kind == "enum":
        key = draw(st.sampled_from(sorted(ENUM_KEYS)))
        choices, allowed = ENUM_KEYS[key]
        word = draw(words.filter(lambda w: w not in allowed and w not in ("true", "false")))
        return choices, f"{key}={word}", key
    group = draw(st.sampled_from(sorted(GROUP_OPTIONS)))
    word = draw(words.filter(lambda w: w not in GROUP_OPTIONS[group]))
    return (), f"{group}={word}", f"{group}={word}"


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(bad_command_lines())
def test_generated_bad_overrides_give_one_line_errors(case: tuple[tuple[str, ...], str, str]) -> None:
    choices, override, fragment = case
    with pytest.raises(ConfigError) as exc_info:
        if override.split("=")[0] in GROUPS:
            preflight([*choices, override], CONFIG_DIR)  # unknown option: fails before composing
        else:
            validate_command_line([*choices, override])
    assert_one_line_error(exc_info, fragment)
