"""Compare runs: find Hydra run folders, group them over seeds, tabulate and plot.

A run folder is any folder with `.hydra/` or `metrics.json` (what `train.py` writes, see the
README). Completed runs are grouped by every parameter that differs between them except `seed`,
and each group is summarized as mean ± sample standard deviation (n - 1) over its runs. Crashed
and unfinished runs are listed apart, never averaged in and never dropped silently.

Parameters of a run are its group choices (`model=mlp`), its flattened config (`optim.lr`) and
its command-line overrides (`.hydra/overrides.yaml`). Only parameters that differ between runs
become columns, and a config key that merely follows a varying choice (`method.name`,
`method.keep_first_real` when `method` varies) is left out unless it was set on the command line.

`scripts/compare.py` is the command line over `main()`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bnn_train.errors import UserError

log = logging.getLogger(__name__)

NONE = "—"  # a key a run does not have; the std of a single run
GROUP_OVER = "seed"
PLOT_HINT = "pip install -e '.[plot]'"

# Why a run is not in the main table (status -> explanation shown under the problem list).
PROBLEMS = {
    "crashed": "no metrics.json (the job failed before training started)",
    "unreadable": "metrics.json is not valid JSON",
    "running": "metrics.json still says running (killed, failed mid-run, or still training)",
    "incomplete": "finished fewer epochs than trainer.epochs",
}


class CompareError(UserError):
    """A folder that does not exist or holds no runs, or --plot without matplotlib."""


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder: its parameters as display strings, its metrics and its status."""

    path: Path
    status: str  # "completed", or a key of PROBLEMS (or an unknown status string)
    params: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    choice_keys: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)
    planned_epochs: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def metric(self, name: str) -> float | None:
        """A metrics.json number (None when absent); accuracies become percentages."""
        value = self.metrics.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return 100.0 * value if name.endswith("_acc") else float(value)


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "metrics.json").is_file()


def find_run_dirs(roots: Sequence[Path | str]) -> list[Path]:
    """Every run folder at or below `roots`, sorted, each once; CompareError for a missing root."""
    found: dict[Path, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise CompareError(f"no such directory: {root}")
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if is_run_dir(here):
                found.setdefault(here.resolve(), here)
                dirnames.clear()  # a run's own tb/, checkpoints/ hold no runs
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found.values(), key=_natural_key)


def load_run(path: Path) -> Run:
    """Read one run folder's metrics.json and .hydra/overrides.yaml."""
    overrides = _read_overrides(path)
    metrics, status = _read_metrics(path)
    choices = metrics.get("choices") or {}
    planned = _planned_epochs(path, metrics)
    if status == "completed" and planned is not None and (metrics.get("epochs_completed") or 0) < planned:
        status = "incomplete"
    return Run(path=path, status=status, params=_params(overrides, metrics), overrides=overrides,
               choice_keys=tuple(choices), metrics=metrics, planned_epochs=planned)


def _read_overrides(path: Path) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(file.read_text()) if file.is_file() else []
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: unreadable (%s)", file, err)
        return []
    return [str(o) for o in overrides or []]


def _read_metrics(path: Path) -> tuple[dict, str]:
    file = path / "metrics.json"
    if not file.is_file():
        return {}, "crashed"
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}, "unreadable"
    if not isinstance(metrics, dict):
        return {}, "unreadable"
    return metrics, str(metrics.get("status") or "completed")


def _planned_epochs(path: Path, metrics: dict) -> int | None:
    """trainer.epochs from metrics.json, else from the composed .hydra/config.yaml."""
    epochs = (metrics.get("config") or {}).get("trainer.epochs")
    if epochs is None:
        try:
            epochs = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())["trainer"]["epochs"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
    return epochs if isinstance(epochs, int) else None


def _params(overrides: list[str], metrics: dict) -> dict[str, str]:
    """Overrides, then config, then choices: later sources hold the typed, canonical values."""
    params = dict(kv for kv in map(_parse_override, overrides) if kv is not None)
    for source in (metrics.get("config") or {}, metrics.get("choices") or {}):
        params.update({key: _text(value) for key, value in source.items()})
    return params


def _parse_override(text: str) -> tuple[str, str] | None:
    """`key=value`, `+key=value`, `++key=value` -> (key, value); `~key` (a deletion) -> None."""
    if text.startswith("~") or "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+"), value


def _text(value: Any) -> str:
    """A config value as the user would type it (flatten() already made lists JSON strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _natural_key(path: Path) -> list:
    """Sort multirun/…/2 before multirun/…/10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


# --------------------------------------------------------------------------------------------
# Columns: what differs between runs
# --------------------------------------------------------------------------------------------


def ordered_keys(runs: Sequence[Run]) -> list[str]:
    """Command-line keys in the order typed, then group choices, then config keys A-Z."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update((kv[0], None) for kv in map(_parse_override, run.overrides) if kv)
    for run in runs:
        keys.update((k, None) for k in run.choice_keys)
    keys.update((k, None) for k in sorted({k for run in runs for k in run.params}))
    return list(keys)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Keys whose value differs between runs, less config keys that just follow a varying choice."""
    varying = [k for k in ordered_keys(runs) if len({run.params.get(k, NONE) for run in runs}) > 1]
    choices = [k for k in varying if any(k in run.choice_keys for run in runs)]
    typed = {kv[0] for run in runs for kv in map(_parse_override, run.overrides) if kv}
    return [k for k in varying if k in choices or k in typed or not _follows(runs, k, choices)]


def _follows(runs: Sequence[Run], key: str, choices: list[str]) -> bool:
    """True when `key` has one value per combination of `choices` (it adds no information)."""
    if not choices:
        return False
    seen: dict[tuple, str] = {}
    for run in runs:
        combo = tuple(run.params.get(c, NONE) for c in choices)
        if seen.setdefault(combo, run.params.get(key, NONE)) != run.params.get(key, NONE):
            return False
    return True


def fixed_params(runs: Sequence[Run], columns: Iterable[str]) -> dict[str, str]:
    """Choices and command-line keys that all runs share (shown once above the table)."""
    shown = set(columns)
    typed = {kv[0] for run in runs for kv in map(_parse_override, run.overrides) if kv}
    fixed = {}
    for key in ordered_keys(runs):
        if key in shown or not (key in typed or any(key in run.choice_keys for run in runs)):
            continue
        values = {run.params.get(key, NONE) for run in runs}
        if len(values) == 1 and values.pop() not in (NONE, "null"):
            fixed[key] = runs[0].params[key]
    return fixed


# --------------------------------------------------------------------------------------------
# Groups over seeds
# --------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the non-None values; std is None for fewer than two."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


@dataclass
class Group:
    """Completed runs with equal values in every column (they differ at most in the seed)."""

    values: tuple[str, ...]
    runs: list[Run]

    @property
    def n(self) -> int:
        return len(self.runs)

    def stat(self, metric: str) -> tuple[float | None, float | None]:
        return mean_std(run.metric(metric) for run in self.runs)

    def label(self, columns: Sequence[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(columns, self.values)) or "all runs"

    def sort_key(self) -> tuple:
        best, final = self.stat("best_val_acc")[0], self.stat("final_val_acc")[0]
        return (-(best if best is not None else -math.inf), -(final if final is not None else -math.inf),
                self.values)


def values_of(run: Run, columns: Sequence[str]) -> tuple[str, ...]:
    return tuple(run.params.get(c, NONE) for c in columns)


def group_runs(runs: Sequence[Run], columns: Sequence[str]) -> list[Group]:
    """Runs grouped by their values in `columns`, best mean accuracy first."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        values = values_of(run, columns)
        groups.setdefault(values, Group(values, [])).runs.append(run)
    return sorted(groups.values(), key=Group.sort_key)


@dataclass
class Comparison:
    """Everything the table, CSV and plot show."""

    roots: list[Path]
    columns: list[str]
    groups: list[Group]
    problems: list[Run]
    fixed: dict[str, str]
    per_run: bool = False

    def title(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def compare(roots: Sequence[Path | str], per_run: bool = False) -> Comparison:
    """Find, read and group the runs below `roots`; CompareError when there are none."""
    roots = [Path(r) for r in roots]
    dirs = find_run_dirs(roots)
    if not dirs:
        raise CompareError(f"no runs below {', '.join(map(str, roots))} "
                           f"(a run folder has .hydra/ or metrics.json)")
    runs = [load_run(d) for d in dirs]
    done = [r for r in runs if r.ok]
    columns = varying_keys(done)
    if per_run:  # one "group" per run, keyed by its folder too
        groups = sorted((Group((*values_of(r, columns), str(r.path)), [r]) for r in done), key=Group.sort_key)
    else:
        columns = [c for c in columns if c != GROUP_OVER]
        groups = group_runs(done, columns)
    return Comparison(roots=roots, columns=columns + (["folder"] if per_run else []), groups=groups,
                      problems=[r for r in runs if not r.ok], fixed=fixed_params(done, columns),
                      per_run=per_run)


# --------------------------------------------------------------------------------------------
# Output: Markdown, CSV
# --------------------------------------------------------------------------------------------

METRIC_HEADERS = ["best val acc (%)", "final val acc (%)", "n", "epochs", "train time", "samples/s"]


def _pct(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def _pm(mean: float | None, std: float | None) -> str:
    """"92.00 ± 2.00"; "80.00 ± —" for a single run."""
    return NONE if mean is None else f"{_pct(mean)} ± {_pct(std)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _span(values: Iterable[float | None]) -> str:
    xs = sorted({int(v) for v in values if v is not None})
    if not xs:
        return NONE
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}–{xs[-1]}"


def metric_headers(per_run: bool) -> list[str]:
    return [h for h in METRIC_HEADERS if not (per_run and h == "n")]


def group_cells(group: Group, per_run: bool = False) -> list[str]:
    """The formatted metric cells of one table row (per run: plain values, no n)."""
    throughput = group.stat("train_samples_per_s")[0]
    acc = [group.stat("best_val_acc"), group.stat("final_val_acc")]
    cells = [_pct(m) if per_run else _pm(m, s) for m, s in acc]
    return cells + ([] if per_run else [str(group.n)]) + [
        _span(r.metric("epochs_completed") for r in group.runs), _duration(group.stat("train_time_s")[0]),
        NONE if throughput is None else f"{throughput:.0f}"]


def problem_cells(run: Run, fixed: dict[str, str]) -> list[str]:
    """Folder, status, epochs done/planned, best accuracy so far, overrides not in `fixed`."""
    done, best = run.metrics.get("epochs_completed"), run.metric("best_val_acc")
    epochs = f"{NONE if done is None else done}/{NONE if run.planned_epochs is None else run.planned_epochs}"
    return [str(run.path), run.status, epochs, _pct(best),
            " ".join(o for o in run.overrides if not _same(_parse_override(o), fixed)) or NONE]


def _same(kv: tuple[str, str] | None, fixed: dict[str, str]) -> bool:
    """An override the "All runs" line already states (`False` as typed = `false` in the config)."""
    return kv is not None and kv[0] in fixed and kv[1].lower() == fixed[kv[0]].lower()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A Markdown table padded to column width, so it also reads well as plain text."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def to_markdown(cmp: Comparison) -> str:
    """The report: fixed parameters, the grouped table, then runs left out of it."""
    done = sum(g.n for g in cmp.groups)
    what = "one row per run" if cmp.per_run else f"{len(cmp.groups)} groups over `{GROUP_OVER}`"
    parts = [f"## {cmp.title()}: {done} completed runs, {what}"]
    if cmp.fixed:
        parts.append("All runs: " + " ".join(f"`{k}={v}`" for k, v in cmp.fixed.items()))
    if cmp.groups:
        headers = metric_headers(cmp.per_run)
        rows = [list(g.values) + group_cells(g, cmp.per_run) for g in cmp.groups]
        numeric = [False] * len(cmp.columns) + [True] * len(headers)
        parts.append(markdown_table(cmp.columns + headers, rows, numeric))
        if not cmp.per_run:
            parts.append("Accuracies: mean ± sample std over the n runs (— for n = 1), best group first; "
                         "time and samples/s: means.")
    else:
        parts.append("No completed runs.")
    if cmp.problems:
        parts.append(f"### Not in the table: {len(cmp.problems)} crashed or unfinished runs")
        header = ["folder", "status", "epochs", "best val acc (%)", "overrides"]
        parts.append(markdown_table(header, [problem_cells(r, cmp.fixed) for r in cmp.problems],
                                    [False, False, True, True, False]))
        statuses = dict.fromkeys(r.status for r in cmp.problems)
        parts.append("; ".join(f"*{s}*: {PROBLEMS.get(s, 'unknown status')}" for s in statuses) + ".")
    return "\n\n".join(parts) + "\n"


CSV_METRICS = ["status", "n", "best_val_acc_pct_mean", "best_val_acc_pct_std", "final_val_acc_pct_mean",
               "final_val_acc_pct_std", "epochs", "train_time_s", "train_samples_per_s", "runs"]


def csv_rows(cmp: Comparison) -> list[dict[str, Any]]:
    """One dict per table row (numbers unformatted, percentages), then one per problem run."""
    rows = []
    for g in cmp.groups:
        (best, best_sd), (final, final_sd) = g.stat("best_val_acc"), g.stat("final_val_acc")
        rows.append({**dict(zip(cmp.columns, g.values)), "status": "completed", "n": g.n,
                     "best_val_acc_pct_mean": best, "best_val_acc_pct_std": best_sd,
                     "final_val_acc_pct_mean": final, "final_val_acc_pct_std": final_sd,
                     "epochs": _epochs(g), "train_time_s": g.stat("train_time_s")[0],
                     "train_samples_per_s": g.stat("train_samples_per_s")[0],
                     "runs": ";".join(str(r.path) for r in g.runs)})
    for run in cmp.problems:
        rows.append({**{c: run.params.get(c) for c in cmp.columns}, "status": run.status, "n": 1,
                     "best_val_acc_pct_mean": run.metric("best_val_acc"),
                     "final_val_acc_pct_mean": run.metric("final_val_acc"),
                     "epochs": run.metrics.get("epochs_completed"), "runs": str(run.path)})
    return rows


def _epochs(group: Group) -> int | float | None:
    """Epochs completed: an int when all runs agree (they do, unless trainer.epochs differs)."""
    values = {r.metrics.get("epochs_completed") for r in group.runs}
    return values.pop() if len(values) == 1 else group.stat("epochs_completed")[0]


def write_csv(cmp: Comparison, path: Path | str) -> Path:
    """CSV of csv_rows(); empty cells for missing values (std of one run, crashed runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in cmp.columns if c != "folder"] + CSV_METRICS,
                                extrasaction="ignore")
        writer.writeheader()
        for row in csv_rows(cmp):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompareError(f"--plot needs matplotlib: {PLOT_HINT}") from None


def curve(group: Group) -> tuple[list[int], list[float], list[float], list[float]]:
    """(epochs, mean, min, max) of the runs' validation accuracy (%) at each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in group.runs:
        for point in run.metrics.get("history") or []:
            if isinstance(point.get("val_acc"), (int, float)) and "epoch" in point:
                by_epoch.setdefault(int(point["epoch"]), []).append(100.0 * point["val_acc"])
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def plot(cmp: Comparison, path: Path | str) -> Path:
    """PNG: validation-accuracy curves per group (mean, min–max band) beside best accuracy bars."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    groups = cmp.groups
    labels = [g.label([c for c in cmp.columns if c != "folder"]) for g in groups]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    # Room for the bar panel's tick labels (group names), so the curve panel keeps its width.
    label_in = 0.075 * max((len(label) for label in labels), default=0)
    height = max(4.5, 0.5 * len(groups) + 2)
    fig = Figure(figsize=(min(11 + label_in, 24), height), layout="constrained")
    ax_curve, ax_bar = fig.subplots(1, 2, width_ratios=[1.3, 1])

    for g, label, color in zip(groups, labels, colors):
        epochs, mean, low, high = curve(g)
        ax_curve.plot(epochs, mean, color=color, marker="o" if len(epochs) < 30 else None, ms=3,
                      label=f"{label} (n={g.n})")
        ax_curve.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    ax_curve.set(xlabel="epoch", ylabel="validation accuracy (%): mean, band: min–max")
    ax_curve.set_title("Validation accuracy per epoch", fontsize="medium")
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.grid(alpha=0.3)
    if len(groups) > 6:  # many lines: keep the legend off the curves
        ax_curve.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15),
                        ncols=2 if max(map(len, labels)) < 40 else 1)
    elif groups:
        ax_curve.legend(fontsize="small", loc="best")
    _bars(ax_bar, groups, labels, colors)
    fig.suptitle(f"{cmp.title()}: {sum(g.n for g in groups)} runs, {len(groups)} groups", fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _bars(ax, groups: Sequence[Group], labels: Sequence[str], colors: Sequence[str]) -> None:
    """Horizontal bars of best accuracy (mean ± std), best group on top, each run as a dot."""
    ys = list(range(len(groups)))[::-1]  # table order, top to bottom
    stats = [g.stat("best_val_acc") for g in groups]
    points = [[v for r in g.runs if (v := r.metric("best_val_acc")) is not None] for g in groups]
    lo, hi = _bar_range(stats, points)
    means = [lo if m is None else m for m, _ in stats]
    ax.barh(ys, [m - lo for m in means], left=lo, color=colors, alpha=0.75,
            xerr=[math.nan if s is None else s for _, s in stats], error_kw={"capsize": 4, "elinewidth": 1})
    for y, xs in zip(ys, points):
        ax.scatter(xs, [y] * len(xs), color="black", s=12, zorder=3)
    ax.set_yticks(ys, [f"{label}\n{_pm(*s)}  (n={g.n})" for label, s, g in zip(labels, stats, groups)],
                  fontsize="small")
    # Accuracies of compared runs often lie within a few points: start the axis near them (and say so).
    ax.set(xlim=(lo, hi), xlabel="best validation accuracy (%): mean ± std, dots: runs"
           + (f"\n(axis starts at {lo:g} %)" if lo > 0 else ""))
    ax.set_title("Best validation accuracy", fontsize="medium")
    ax.grid(axis="x", alpha=0.3)


def _bar_range(stats: Sequence[tuple], points: Sequence[list[float]]) -> tuple[float, float]:
    """x-limits holding every run and error bar; from 0 unless the values sit far above it."""
    values = [v for xs in points for v in xs] + [m + sign * s for m, s in stats if m is not None and s
                                                  for sign in (-1, 1)]
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    pad = max(0.5, 0.15 * (high - low))
    lo = math.floor(low - pad)
    lo = 0.0 if lo < 0.5 * high else float(lo)
    return lo, min(high + pad, 100.0 + 0.02 * (high + pad - lo))  # no empty room past 100 %


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare.py", description="Compare runs below Hydra output folders (outputs/..., multirun/...): "
        "a Markdown table on stdout, grouped over seeds, best mean accuracy first.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run, sweep, outputs/ or multirun/ folders")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write compare.md and compare.csv (and compare.png with --plot) into DIR")
    # A flag, not `--plot [PNG]`: an optional value would swallow the folder in `--plot multirun/x`.
    parser.add_argument("--plot", action="store_true",
                        help="also write compare.png (needs matplotlib) into --out DIR, else into the first folder")
    parser.add_argument("--runs", action="store_true", help="one row per run instead of groups over seeds")
    return parser.parse_args(argv)


def report(args: argparse.Namespace) -> None:
    """Build the comparison and write every requested output."""
    if args.plot:
        require_matplotlib()  # fail before reading hundreds of runs
    cmp = compare(args.dirs, per_run=args.runs)
    text = to_markdown(cmp)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(text)
        log.info("wrote %s", args.out / "compare.md")
        log.info("wrote %s", write_csv(cmp, args.out / "compare.csv"))
    if args.csv is not None:
        log.info("wrote %s", write_csv(cmp, args.csv))
    if args.plot:
        log.info("wrote %s", plot(cmp, (args.out or args.dirs[0]) / "compare.png"))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 on success; a one-line `error: ...` on stderr and UserError's code otherwise."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: stdout is the table
    try:
        report(parse_args(argv))
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # e.g. an unwritable --out folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
