"""Command-line front door: catch bad overrides before Hydra runs, print user errors in one line.

`train.py` wires it up like this:

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    @report_user_errors
    def main(cfg): ...

    run_cli(lambda: (check_overrides(sys.argv[1:], CONFIG_DIR), main()))

so `python train.py optim.lrr=0.1` (or a sweep with one bad value) stops before any job with

    error: optim.lrr=0.1: optim (adam) has no key 'lrr' (did you mean 'lr'?); valid keys: ...

instead of Hydra's multi-line report, or a traceback from the third job of a sweep. Errors found
while a job runs (DataError, TrainingError, ...) are printed the same way. HYDRA_FULL_ERROR=1
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser @hydra.main uses on sys.argv
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, OverrideType
from hydra.errors import CompactHydraException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnn_train.config import describe_node, unknown_key_error, validate
from bnn_train import sweep
from bnn_train.errors import ConfigError, UserError

__all__ = ["check_overrides", "run_cli", "report_user_errors", "one_line"]

T = TypeVar("T")
log = logging.getLogger(__name__)

# The user's own HYDRA_FULL_ERROR=1 while run_cli runs (run_cli sets the variable itself).
_user_wants_traceback: Optional[bool] = None


def check_overrides(overrides: list[str], config_dir: Path, config_name: str = "train") -> None:
    """Raise a one-line ConfigError for a command line that would fail in Hydra or in validate().

    Checks group options (`model=nonexistent`, also inside sweeps), that plain `key=value`
    overrides name existing keys, and every value with validate(), each swept value included.
    `+key`, `++key`, `~key` are applied as given, `hydra.*` overrides and flags are ignored.
    """
    args = _hydra_args(overrides)
    if args is None or _not_a_run(args):
        return  # Hydra prints help/version/info or its own usage error
    parsed = [_parse(text) for text in args.overrides]
    multirun = args.multirun or any(_sets_multirun_mode(o) for o in parsed)
    group_choices, passthrough, key_overrides = _classify(parsed, _group_options(Path(config_dir)), multirun)
    try:
        # The context manager restores GlobalHydra, so @hydra.main still works afterwards.
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            for choices in _group_variants(group_choices):
                cfg = compose(config_name=args.config_name or config_name, overrides=choices + passthrough)
                _check_keys_exist(cfg, [o for o, _ in key_overrides])
                if args.cfg is None:  # --cfg only prints the config: let it show bad values
                    _check_values(cfg, key_overrides, pairs=not multirun)
                    _check_checkpoint_paths(cfg, key_overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    if args.cfg is None:  # the run (or sweep) folder Hydra will create before the job starts
        _check_output_dir(parsed, multirun, Path(config_dir), args.config_name or config_name)


def run_cli(main_fn: Callable[[], T]) -> T:
    """Run `main_fn`; print a UserError as `error: <message>` on stderr and exit with its code.

    With HYDRA_FULL_ERROR=1 in the environment the error is re-raised to show the traceback.
    """
    global _user_wants_traceback
    saved = os.environ.get("HYDRA_FULL_ERROR")
    _user_wants_traceback = saved == "1"
    # Hydra catches what a sweep's jobs raise, prints a traceback and exits 1; with
    # HYDRA_FULL_ERROR=1 it re-raises instead, so the first failed job's error reaches us here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main_fn()
    except (UserError, CompactHydraException, OSError) as caught:
        # OSError: Hydra's own file work (creating the run folder, .hydra/, train.log) happens
        # outside the task, where report_user_errors cannot see it.
        err = caught if not isinstance(caught, OSError) else _as_user_error(caught)
        if err is None or _user_wants_traceback:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(getattr(err, "exit_code", ConfigError.exit_code)) from None
    finally:
        sweep.print_summary()
        _user_wants_traceback = None
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def report_user_errors(task_fn: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Decorate the @hydra.main task (below @hydra.main) so a UserError it raises reads well.

    Single run: `error: <message>` on stderr and exit with the error's code, nothing else
    (re-raising would make Hydra add "Error executing job with overrides: ..."). Sweep: the
    message is logged (console and the job's log file) and the error re-raised, so Hydra marks
    the job failed, runs the remaining jobs, then raises the first failure for run_cli to print.
    """

    @functools.wraps(task_fn)  # Hydra follows __wrapped__ to find configs/ next to train.py
    def task(cfg: DictConfig) -> T:
        try:
            return task_fn(cfg)
        except (UserError, OSError) as caught:
            err = _as_user_error(caught)
            if err is None or _traceback_wanted():
                raise
            if _in_multirun():
                log.error("%s", one_line(err))
                if err is caught:
                    raise
                raise err from caught
            print(f"error: {one_line(err)}", file=sys.stderr)
            # SystemExit is not an Exception: it passes Hydra's handlers untouched.
            raise SystemExit(err.exit_code) from None

    return task


def _as_user_error(err: BaseException) -> Optional[UserError]:
    """A UserError as is; an OSError about a named file (a full disk, a read-only or vanished
    folder, a permission) as a one-line UserError; None for anything else (a bug: traceback)."""
    if isinstance(err, UserError):
        return err
    if not isinstance(err, OSError) or err.filename is None:
        return None
    name = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    reason = err.strerror or type(err).__name__
    return UserError(f"cannot use {name} ({reason}): check that path, its permissions and free space, or set "
                     f"hydra.run.dir=PATH to a writable folder (HYDRA_FULL_ERROR=1 shows where it failed)")


def _traceback_wanted() -> bool:
    if _user_wants_traceback is not None:
        return _user_wants_traceback
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # HydraConfig not set: called outside a Hydra job
        return False


def one_line(err: BaseException) -> str:
    """An exception's message on one line, without Hydra/OmegaConf's context lines."""
    text = _join_lines(str(err)) or type(err).__name__
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):  # Hydra keeps the precise reason there
        reason = _join_lines(str(cause))
        if reason and reason not in text:
            text = f"{text} ({reason})"
    return text


# --------------------------------------------------------------------------------------------
# Reading the command line
# --------------------------------------------------------------------------------------------


class _ArgparseExit(Exception):
    pass


def _raise_argparse_exit(*_args: Any, **_kwargs: Any) -> None:
    raise _ArgparseExit


def _hydra_args(argv: list[str]) -> Optional[Any]:
    """argv parsed as @hydra.main will parse it; None when argparse would exit (usage error)."""
    parser = get_args_parser()
    parser.exit = parser.error = _raise_argparse_exit  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --version prints before it exits
            return parser.parse_args(argv)
    except _ArgparseExit:
        return None


def _not_a_run(args: Any) -> bool:
    """Flags that show information instead of running, or configs from another search path."""
    return bool(
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.experimental_rerun
        or args.config_path
        or args.config_dir
    )


_PARSER: Optional[OverridesParser] = None


def _parse(text: str) -> Override:
    """One override through Hydra's own grammar (sweeps, globs, quoting, +/++/~ prefixes)."""
    global _PARSER
    if _PARSER is None:
        _PARSER = OverridesParser.create()
    try:
        return _PARSER.parse_override(text)
    except HydraException as err:
        reason = _join_lines(str(err)).replace(f"Error parsing override '{text}' ", "")
        raise ConfigError(f"{text}: cannot parse this override ({reason})") from None


def _sets_multirun_mode(o: Override) -> bool:
    return o.key_or_group == "hydra.mode" and str(o.value()).upper() == "MULTIRUN"


def _classify(
    parsed: list[Override], groups: dict[str, list[str]], multirun: bool
) -> tuple[dict[str, list[str]], list[str], list[tuple[Override, list[Any]]]]:
    """Split overrides into group choices, pass-through lines and key overrides with values.

    group choices: group -> one `group=option` line per (swept) value, options checked;
    pass-through: +key, ++key, ~key, group@pkg lines, composed as given (first swept value);
    key overrides: plain `key=value` with the typed values to validate.
    """
    group_choices: dict[str, list[str]] = {}
    passthrough: list[str] = []
    key_overrides: list[tuple[Override, list[Any]]] = []
    for o in parsed:
        if o.is_hydra_override():
            continue
        if o.is_sweep_override() and not multirun:
            raise ConfigError(
                f"{o.input_line}: a sweep needs -m (--multirun); for a list write "
                f"{o.key_or_group}=[a,b], for a string quote it: {o.key_or_group}='a,b'"
            )
        if o.type != OverrideType.CHANGE or o.package is not None:
            passthrough += _sweep_lines(o, groups.get(o.key_or_group, []))[:1]
        elif o.key_or_group in groups:
            group_choices[o.key_or_group] = _group_lines(o, groups[o.key_or_group])
        else:
            key_overrides.append((o, _key_values(o)))
    return group_choices, passthrough, key_overrides


def _group_options(config_dir: Path) -> dict[str, list[str]]:
    """{group: options} from the folders under configs/ (nested folders are nested groups)."""
    groups = {}
    for folder in sorted(p for p in config_dir.rglob("*") if p.is_dir()):
        names = {f.stem for f in folder.iterdir() if f.suffix in (".yaml", ".yml")}
        groups[folder.relative_to(config_dir).as_posix()] = sorted(names)
    return groups


def _sweep_lines(o: Override, options: list[str]) -> list[str]:
    """`key=value` for each value the override stands for (one unless it is a sweep)."""
    if not o.is_sweep_override():
        return [o.input_line]
    return [f"{o.get_key_element()}={value}" for value in _sweep_values(o, options)]


def _sweep_values(o: Override, options: list[str]) -> list[str]:
    """Values of a sweep as strings, like Hydra's BasicSweeper; [] for continuous ranges."""
    sweep = o.value()
    if isinstance(sweep, Glob):
        return sweep.filter(options)
    if not o.is_discrete_sweep():
        return []  # interval(): only other sweepers (optuna, ...) sample it
    return list(o.sweep_string_iterator())


def _group_lines(o: Override, options: list[str]) -> list[str]:
    """`group=option` per value; raise for an option that has no YAML file."""
    group = o.key_or_group
    if isinstance(o.value(), Glob):
        values = _sweep_values(o, options)
        if not values:
            raise ConfigError(f"{o.input_line}: matches no option; choose from: {_listing(options)}")
    elif o.is_sweep_override():
        values = _sweep_values(o, options)
    else:
        value = o.value()
        values = value if isinstance(value, list) else [value]  # [a,b]: several configs merged
    for value in values:
        if value is None or value == "null":
            # Hydra 1.3 fails on GROUP=null with a ValueError traceback ("Config group override
            # must be a string or a list"); in a sweep it looks for a file named null.yaml.
            raise ConfigError(
                f"{group}=null: Hydra cannot select null on the command line; "
                f"leave {group} out to keep its default, or drop it with ~{group}"
            )
        if str(value) not in options:
            raise ConfigError(f"{group}={value}: unknown option; choose one of: {_listing(options)}")
    return _sweep_lines(o, options)


def _listing(options: list[str]) -> str:
    return ", ".join(options) if options else "(none yet: the folder has no .yaml files)"


def _key_values(o: Override) -> list[Any]:
    """Typed values of a key override; each swept string is re-parsed as the sweeper's job does."""
    if not o.is_sweep_override():
        return [o.value()]
    return [_parse(f"{o.key_or_group}={text}").value() for text in _sweep_values(o, [])]


def _group_variants(choices: dict[str, list[str]]) -> list[list[str]]:
    """First value of every swept group, then each other value of one group at a time.

    Linear in the number of values (not the full product), yet every option gets composed
    with the key overrides, so `-m model=mlp,resnet18 model.depth=4` fails for resnet18.
    """
    first = {group: lines[0] for group, lines in choices.items()}
    variants = [list(first.values())]
    for group, lines in choices.items():
        variants += [list({**first, group: line}.values()) for line in lines[1:]]
    return variants


# --------------------------------------------------------------------------------------------
# Checking against the composed config
# --------------------------------------------------------------------------------------------


def _check_keys_exist(cfg: DictConfig, overrides: Iterable[Override]) -> None:
    """Each plain `a.b.c=value` must name an existing key (Hydra adds keys only with +)."""
    for o in overrides:
        parts = o.key_or_group.split(".")
        node: Any = cfg
        for depth, part in enumerate(parts):
            path = ".".join(parts[:depth])
            if isinstance(node, ListConfig):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"{o.input_line}: {path} is a list of {len(node)} values")
            elif not isinstance(node, DictConfig):
                raise ConfigError(f"{o.input_line}: {path} is a value, not a group of keys")
            elif part not in node.keys():  # `in` is False for a ??? (missing) value
                raise unknown_key_error(o.input_line, describe_node(path, node), part, node.keys())
            if depth + 1 < len(parts):  # step down; the leaf is not read (nor resolved)
                node = node[int(part)] if isinstance(node, ListConfig) else node[part]


def _check_values(cfg: DictConfig, key_overrides: list[tuple[Override, list[Any]]], pairs: bool) -> None:
    """validate() the config with the first value of every key, then each other swept value.

    pairs=False leaves model x method pairs to each job: a sweep over a grid runs its sensible
    pairs and rejects the others one by one, instead of refusing the whole grid.
    """
    base = copy.deepcopy(cfg)
    for o, values in key_overrides:
        if values:
            OmegaConf.update(base, o.key_or_group, values[0], merge=True)  # as Hydra applies it
    validate(base, pairs=pairs)
    for o, values in key_overrides:
        for value in values[1:]:
            job = copy.deepcopy(base)
            OmegaConf.update(job, o.key_or_group, value, merge=True)
            validate(job, pairs=pairs)


# --------------------------------------------------------------------------------------------
# Files the run will need: the checkpoint it starts from, the folder it writes into
# --------------------------------------------------------------------------------------------


def _check_checkpoint_paths(cfg: DictConfig, key_overrides: list[tuple[Override, list[Any]]]) -> None:
    """An existing ckpt_path (each swept value) must look like a checkpoint: an empty, text, foreign
    or truncated file is reported before the data is loaded (torch reads it later, in the job).

    A path that does not exist yet is left to the job, which reports it the same way: a sweep
    submitted to Slurm may name the checkpoint an earlier job will write. With trainer.resume
    true/auto the job may not read ckpt_path at all (it continues from the run's last.pt).
    """
    def values(key: str) -> list[Any]:
        given = next((vals for o, vals in key_overrides if o.key_or_group == key), None)
        return given if given is not None else [OmegaConf.select(cfg, key, default=None)]

    if any(str(r).lower() != "false" for r in values("trainer.resume")):
        return
    paths = [p for p in values("ckpt_path") if p is not None and os.path.lexists(str(p))]
    if paths:
        from bnn_train.train.checkpoint import check_checkpoint_file  # imports torch: only when needed

        for path in paths:
            check_checkpoint_file(str(path))


# Hydra's own defaults, when the primary config does not set them.
_HYDRA_DIRS = {"hydra.run.dir": "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}",
               "hydra.sweep.dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"}


def _check_output_dir(parsed: list[Override], multirun: bool, config_dir: Path, config_name: str) -> None:
    """Fail before any work when Hydra could not create the run (or sweep) folder.

    Hydra creates it just before the job, outside the task, and an error there is a traceback.
    The folder's first existing ancestor must be a folder in which a folder can be made (tried
    for real: root passes every permission check, yet cannot write under /proc or a read-only
    mount). Interpolations (${now:...}) are cut off: only the fixed part of the path is checked.
    """
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in parsed if o.key_or_group == key and not o.is_sweep_override()
             and o.type != OverrideType.DEL]
    if given:
        value, shown = str(given[-1].value()), f"{key}={given[-1].value()}"
    else:
        value = _configured_dir(config_dir, config_name, key)
        shown = f"{key}={value} (the default, under {os.getcwd()})"
    folder = _fixed_part(value)
    ancestor = Path(os.path.abspath(folder))
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{shown}: cannot create the output folder, {ancestor} is a file, not a folder; "
                          f"set {key}=PATH to a folder that can be created")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bnn-train-write-check-", dir=ancestor))
    except OSError as err:
        raise ConfigError(f"{shown}: cannot create the output folder, {ancestor} does not accept new folders "
                          f"({err.strerror}); set {key}=PATH to a writable folder") from None


def _configured_dir(config_dir: Path, config_name: str, key: str) -> str:
    """hydra.run.dir / hydra.sweep.dir as the primary config writes it (unresolved)."""
    try:
        primary = OmegaConf.load(config_dir / f"{config_name}.yaml")
        node = OmegaConf.to_container(primary, resolve=False)
        for part in key.split("."):
            node = node[part]
        return str(node)
    except (OSError, KeyError, TypeError, OmegaConfBaseException):
        return _HYDRA_DIRS[key]


def _fixed_part(value: str) -> str:
    """The path up to its first interpolation: `outputs/${now:...}/x` -> `outputs`."""
    if "${" not in value:
        return value or "."
    prefix = value.split("${", 1)[0]
    return os.path.dirname(prefix) or "."


def _join_lines(text: str) -> str:
    """Keep the message lines, drop context (full_key:, search path, trailers), join them."""
    kept: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(_CONTEXT_LINES):
            continue
        if line.startswith("Config search path"):
            break  # followed only by the search path entries
        kept.append(line)
    joined = ""
    for line in kept:
        sep = "" if not joined else (" " if joined.endswith((".", ":", "?", "!")) else "; ")
        joined += sep + line
    return joined


_CONTEXT_LINES = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
    "See https://hydra.cc",
)
