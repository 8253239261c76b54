"""Command-line front door, on Hydra's public API: bad command lines and user errors in one line.

`train.py` wires it up like this:

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    @report_user_errors
    def main(cfg): ...

    run_cli(lambda: (preflight(sys.argv[1:], CONFIG_DIR), main()))

`preflight` composes the command line (every swept value included) with `hydra.compose` and checks
it with `config.validate` before Hydra creates any folder, so `python train.py optim.lrr=0.1` stops with

    error: optim.lrr=0.1: optim (adam) has no key 'lrr' (did you mean 'lr'?); valid keys: ...

Errors raised while a job runs (DataError, TrainingError, ...) print the same way; a failed job of a
sweep is logged and recorded, the other jobs run, and the sweep exits with the first failure's code.
HYDRA_FULL_ERROR=1 shows tracebacks instead; Hydra's own errors keep Hydra's short form.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from bnn_train import sweep
from bnn_train.config import describe_node, format_value, unknown_key_error, validate
from bnn_train.errors import ConfigError, UserError

__all__ = ["preflight", "run_cli", "report_user_errors", "one_line"]

T = TypeVar("T")
log = logging.getLogger(__name__)
_RUN_FLAGS = {"-m", "--multirun"}  # any other flag (--help, --cfg, -cn, ...) is left to Hydra
_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def preflight(argv: list[str], config_dir: Path, config_name: str = "train") -> None:
    """Raise a one-line ConfigError for a command line that Hydra or `validate` would reject."""
    if any(a.startswith("-") and a not in _RUN_FLAGS for a in argv):
        return
    multirun = any(a in _RUN_FLAGS for a in argv)
    parser = OverridesParser.create()
    parsed = [_parse(parser, a) for a in argv if a and not a.startswith("-")]
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override() and not o.is_sweep_override()]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for i, overrides in enumerate(_variants(parsed, Path(config_dir), multirun)):
            cfg = _compose(config_name, overrides + hydra_overrides)
            if i == 0:  # the run (or sweep) folder is the same for every variant
                _check_output_dir(key, OmegaConf.select(cfg, key))
            validate(cfg, pairs=not multirun)  # a grid may hold pairs its jobs reject one by one
            _check_checkpoint(cfg)


def _check_output_dir(key: str, folder: str) -> None:
    """Hydra creates the run (or sweep) folder outside the task, where a failure is a traceback: make
    sure that a folder can be made there first (tried for real: root passes every permission check,
    yet cannot write under /proc or a read-only mount)."""
    ancestor = Path(os.path.abspath(folder))
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(0, "a file, not a folder")
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as err:
        raise ConfigError(f"{key}={folder}: cannot create the output folder under {ancestor} ({err.strerror}); "
                          f"set {key}=PATH to a writable folder") from None


def _parse(parser: OverridesParser, text: str) -> Override:
    try:
        return parser.parse_override(text)
    except HydraException as err:
        reason = one_line(err).replace(f"Error parsing override '{text}' ", "")
        raise ConfigError(f"{text}: cannot parse this override ({reason})") from None


def _variants(parsed: list[Override], config_dir: Path, multirun: bool) -> list[list[str]]:
    """The first value of every override, then each other swept value of one override at a time:
    linear in the number of values, yet every value is composed once."""
    lines: list[list[str]] = []
    for o in parsed:
        if o.is_hydra_override():
            continue
        if o.is_sweep_override() and not multirun:
            raise ConfigError(f"{o.input_line}: a sweep needs -m (--multirun); for a list write "
                              f"{o.key_or_group}=[a,b], for a string quote it: {o.key_or_group}='a,b'")
        options = sorted(p.stem for p in (config_dir / o.key_or_group).glob("*.yaml"))
        if o.value() is None and (config_dir / o.key_or_group).is_dir():
            raise ConfigError(f"{o.key_or_group}=null: Hydra cannot select null on the command line; leave "
                              f"{o.key_or_group} out to keep its default, or drop it with ~{o.key_or_group}")
        if isinstance(o.value(), Glob):
            values = o.value().filter(options)
            if not values:
                raise ConfigError(f"{o.input_line}: matches no option; choose from: {', '.join(options)}")
        elif o.is_discrete_sweep():
            values = list(o.sweep_string_iterator())
        else:
            values = [None]  # a plain override (or a range only other sweepers sample)
        lines.append([o.input_line if v is None else f"{o.get_key_element()}={v}" for v in values])
    first = [values[0] for values in lines]
    variants = [first]
    for i, values in enumerate(lines):
        variants += [first[:i] + [v] + first[i + 1:] for v in values[1:]]
    return variants


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise _unknown_option(err, overrides) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise _explain(err, config_name, overrides) from None


def _unknown_option(err: MissingConfigException, overrides: list[str]) -> ConfigError:
    """`group=option` naming a YAML that does not exist, with the group's options."""
    for text in overrides:
        group, _, option = text.lstrip("+").partition("=")
        if f"'{group}/{option}'" in str(err):
            return ConfigError(f"{text}: unknown option; choose one of: {', '.join(sorted(err.options or []))}")
    return ConfigError(one_line(err))


def _explain(err: Exception, config_name: str, overrides: list[str]) -> ConfigError:
    """An override Hydra could not apply, as `key=value: what is wrong`."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    key = getattr(cause, "full_key", None)
    text = next((o for o in overrides if key and o.lstrip("+~").split("=", 1)[0] == key), None)
    if key is None or text is None:
        return ConfigError(one_line(err))
    if isinstance(cause, ValidationError):
        message = str(cause)
        wanted = message.split("converted to")[1].split()[0].strip(".") if "converted to" in message else \
            "Boolean" if "not a valid bool" in message else None
        if wanted is not None:
            value = text.split("=", 1)[1]
            return ConfigError(f"{key}={format_value(value)}: must be {_TYPE_WORDS.get(wanted, wanted)}")
    parent_path, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o is not text]
    parent = OmegaConf.select(compose(config_name=config_name, overrides=rest), parent_path) if parent_path \
        else compose(config_name=config_name, overrides=rest)
    if isinstance(parent, DictConfig) and leaf not in parent:
        return unknown_key_error(text.lstrip("+"), describe_node(parent_path, parent), leaf, parent.keys())
    return ConfigError(f"{text}: {one_line(cause)}")


def _check_checkpoint(cfg: DictConfig) -> None:
    """An existing ckpt_path must look like a checkpoint, reported before the data is loaded; a path
    that does not exist yet is left to the job (an earlier job of a Slurm sweep may write it)."""
    path = cfg.get("ckpt_path")
    if path is not None and str(cfg.trainer.resume).lower() == "false" and os.path.lexists(str(path)):
        from bnn_train.train.checkpoint import check_checkpoint_file  # imports torch: only when needed

        check_checkpoint_file(str(path))


def run_cli(main_fn: Callable[[], T]) -> T:
    """Run `main_fn`; print a UserError as `error: <message>` on stderr and exit with its code. After
    a sweep: its summary, and the exit code of its first failed job."""
    try:
        result = main_fn()
    except (UserError, OSError) as caught:
        err = _as_user_error(caught)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    finally:
        failure = sweep.print_summary()
    if failure is not None:
        print(f"error: {failure['error']}", file=sys.stderr)
        raise SystemExit(failure.get("exit_code") or 1)
    return result


def report_user_errors(task_fn: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Decorate the @hydra.main task (below @hydra.main) so that a UserError it raises reads well:
    a single run prints `error: <message>` and exits with the error's code; a sweep job logs the
    message and returns a `sweep.JobFailure`, which the sweep records, so the other jobs run."""

    @functools.wraps(task_fn)  # Hydra follows __wrapped__ to find configs/ next to train.py
    def task(cfg: DictConfig) -> T:
        try:
            return task_fn(cfg)
        except (UserError, OSError) as caught:
            err = _as_user_error(caught)
            if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if _in_multirun():
                log.error("%s", one_line(err))
                return sweep.JobFailure(one_line(err), err.exit_code)
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None  # not an Exception: passes Hydra's handlers

    return task


def _as_user_error(err: BaseException) -> UserError | None:
    """A UserError as is; an OSError about a named file (a full disk, a read-only folder, a name too
    long) as a one-line UserError; None for anything else (a bug: traceback)."""
    if isinstance(err, UserError):
        return err
    if not isinstance(err, OSError) or err.filename is None:
        return None
    key = "hydra.sweep.dir or hydra.sweep.subdir" if _in_multirun() else "hydra.run.dir"
    return UserError(f"cannot use {err.filename} ({err.strerror or type(err).__name__}): check that path, its "
                     f"permissions and free space, or set {key} to a writable folder with a shorter name")


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # HydraConfig not set: called outside a Hydra job
        return False


def one_line(err: BaseException) -> str:
    """An exception's message on one line, without Hydra/OmegaConf's context lines."""
    kept = []
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=", "Set the environment",
                                         "See https://hydra.cc")):
            kept.append(line)
    return "; ".join(kept) or type(err).__name__
