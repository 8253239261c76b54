"""bnn_train/compare.py and scripts/compare.py on run folders written by hand (no training)."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bnn_train.compare import CompareError, compare, find_run_dirs, main, to_markdown, write_csv

REPO = Path(__file__).resolve().parents[1]

# The keys each method sets in the flattened config, as `method=NAME` would.
METHOD_KEYS = {
    "fp": {"method.clip_latent": "null", "method.keep_first_real": True},
    "bnn": {"method.clip_latent": 1.0, "method.keep_first_real": True},
    "xnor": {"method.clip_latent": 1.0, "method.keep_first_real": False},
}


def make_run(folder: Path, method: str = "bnn", seed: int = 0, best: float | None = 0.9,
             status: str | None = "completed", epochs: int = 2, planned: int = 2, lr: float | None = None,
             extra_config: dict | None = None) -> Path:
    """A run folder as train.py leaves it; status=None: crashed before metrics.json was written."""
    overrides = [f"method={method}", "model=mlp", f"seed={seed}"] + ([f"optim.lr={lr}"] if lr is not None else [])
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status is None:
        return folder
    choices = {"model": "mlp", "method": method, "optim": "adam", "experiment": None}
    config = {**choices, "seed": seed, "model.name": "mlp", "model.width": 1024, "method.name": method,
              **METHOD_KEYS[method], "optim.lr": lr or 0.001, "data.batch_size": 64,
              "trainer.epochs": planned, **(extra_config or {})}
    history = [{"epoch": e + 1, "step": 10 * (e + 1), "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                "val_acc": best * (e + 1) / epochs, "lr": 0.001, "time_s": 1.0} for e in range(epochs)]
    metrics = {"status": status, "best_val_acc": best, "final_val_acc": history[-1]["val_acc"] if history else None,
               "epochs_completed": epochs, "steps": 10 * epochs, "train_time_s": 2.0 * epochs,
               "train_samples_per_s": 1000.0, "binary_params": 10, "real_params": 5, "history": history,
               "choices": choices, "config": config}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def sweep(tmp_path):
    """multirun/<date>/<time>/: bnn (3 seeds), xnor (2 seeds), fp (1 seed), like a Hydra sweep."""
    root = tmp_path / "multirun" / "2026-11-22" / "10-00-00"
    runs = [("bnn", 0, 0.90), ("bnn", 1, 0.92), ("bnn", 2, 0.94), ("xnor", 0, 0.95), ("xnor", 1, 0.97),
            ("fp", 0, 0.80)]
    for job, (method, seed, best) in enumerate(runs):
        make_run(root / str(job), method, seed, best)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def group(cmp, method):
    (g,) = [g for g in cmp.groups if dict(zip(cmp.columns, g.values))["method"] == method]
    return g


def test_groups_over_seeds_with_exact_mean_std_n(sweep):
    cmp = compare([sweep])
    bnn, xnor, fp = group(cmp, "bnn"), group(cmp, "xnor"), group(cmp, "fp")
    assert (bnn.n, xnor.n, fp.n) == (3, 2, 1)
    assert bnn.stat("best_val_acc") == pytest.approx((92.0, 2.0))  # sample std of 90, 92, 94
    assert xnor.stat("best_val_acc") == pytest.approx((96.0, statistics.stdev([95.0, 97.0])))
    assert fp.stat("best_val_acc") == pytest.approx((80.0, None))
    table = to_markdown(cmp)
    assert "92.00 ± 2.00" in table and "96.00 ± 1.41" in table and "80.00 ± —" in table


def test_only_varying_columns(sweep):
    cmp = compare([sweep])
    # method varies; method.name / method.clip_latent / keep_first_real just follow it; seed is grouped over.
    assert cmp.columns == ["method"]
    header = to_markdown(cmp).split("| method |")[1].splitlines()[0]
    assert "optim" not in header and "model" not in header and "seed" not in header
    assert cmp.fixed["model"] == "mlp"  # constant choices are stated once, above the table


def test_varying_override_and_unexplained_config_key_are_columns(tmp_path):
    make_run(tmp_path / "0", "bnn", lr=0.001)
    make_run(tmp_path / "1", "bnn", lr=0.01, extra_config={"model.width": 512})
    make_run(tmp_path / "2", "xnor", lr=0.01)
    cmp = compare([tmp_path])
    # method varies, optim.lr was typed, model.width differs between runs with the same choices.
    assert cmp.columns == ["method", "optim.lr", "model.width"]
    assert [len(g.runs) for g in cmp.groups] == [1, 1, 1]


def test_sorted_by_mean_best_accuracy(sweep):
    cmp = compare([sweep])
    assert [dict(zip(cmp.columns, g.values))["method"] for g in cmp.groups] == ["xnor", "bnn", "fp"]
    rows = [line for line in to_markdown(cmp).splitlines() if line.startswith("| ") and "±" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["xnor", "bnn", "fp"]


def test_crashed_and_incomplete_runs_are_reported_not_averaged(sweep):
    make_run(sweep / "6", "bnn", 3, status=None)  # crashed before its first metrics.json
    make_run(sweep / "7", "bnn", 4, best=0.99, status="running", epochs=1)  # killed
    make_run(sweep / "8", "bnn", 5, best=0.99, epochs=1, planned=2)  # stopped early
    (sweep / "9").mkdir()
    (sweep / "9" / "metrics.json").write_text("{not json")
    cmp = compare([sweep])
    assert {r.path.name: r.status for r in cmp.problems} == {
        "6": "crashed", "7": "running", "8": "incomplete", "9": "unreadable"}
    assert group(cmp, "bnn").n == 3 and group(cmp, "bnn").stat("best_val_acc")[0] == pytest.approx(92.0)
    report = to_markdown(cmp).split("### Not in the table")[1]
    for name, status in [("6", "crashed"), ("7", "running"), ("8", "incomplete"), ("9", "unreadable")]:
        assert f"| {sweep / name}" in report and status in report
    assert "1/2" in report and "seed=3" in report  # epochs done/planned; overrides identify the job


def test_csv_round_trip(sweep, tmp_path):
    make_run(sweep / "6", "bnn", 3, status=None)
    cmp = compare([sweep])
    path = write_csv(cmp, tmp_path / "out" / "table.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["xnor", "bnn", "fp", "bnn"]
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["crashed"]
    for row, g in zip(rows, cmp.groups):
        mean, std = g.stat("best_val_acc")
        assert float(row["best_val_acc_pct_mean"]) == pytest.approx(mean)
        if std is None:  # one run: no std, an empty cell
            assert row["best_val_acc_pct_std"] == ""
        else:
            assert float(row["best_val_acc_pct_std"]) == pytest.approx(std)
        assert int(row["n"]) == g.n and int(row["epochs"]) == 2
        assert row["runs"].split(";") == [str(r.path) for r in g.runs]
    assert rows[-1]["runs"] == str(sweep / "6") and rows[-1]["best_val_acc_pct_mean"] == ""


def test_finds_runs_in_outputs_and_multirun_folders(tmp_path):
    make_run(tmp_path / "outputs" / "2026-11-22" / "09-00-00")
    for job in (10, 2):
        make_run(tmp_path / "multirun" / "2026-11-22" / "10-00-00" / str(job))
    (tmp_path / "outputs" / "2026-11-22" / "09-00-00" / "tb" / ".hydra").mkdir(parents=True)  # inside a run
    found = find_run_dirs([tmp_path / "multirun", tmp_path / "outputs", tmp_path])  # overlapping roots
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "multirun/2026-11-22/10-00-00/2", "multirun/2026-11-22/10-00-00/10", "outputs/2026-11-22/09-00-00"]


def test_missing_dir_and_no_runs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(CompareError, match="no such directory"):
        compare([tmp_path / "nope"])
    assert main([str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no such directory")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) != 0
    assert capsys.readouterr().err.startswith("error: no runs below")


def test_main_prints_table_and_writes_out_dir(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "report"), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## {sweep}") and "| method |" in out
    assert (tmp_path / "report" / "compare.md").read_text() == out
    assert (tmp_path / "report" / "compare.csv").read_text() == (tmp_path / "t.csv").read_text()


def test_per_run_rows(sweep, capsys):
    assert main([str(sweep), "--runs"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if str(sweep) in line and line.startswith("|")]
    assert len(rows) == 6 and "97.00" in rows[0] and "±" not in rows[0]


def test_plot_writes_png(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    make_run(sweep / "6", "bnn", 3, status=None)  # problem runs must not break the plot
    assert main(["--plot", str(sweep), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(sweep), "--plot"]) == 0  # no --out: next to the runs
    assert (sweep / "compare.png").is_file()


def test_plot_without_matplotlib_says_how_to_install(sweep, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main([str(sweep), "--plot"]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "pip install -e '.[plot]'" in captured.err
    assert captured.err.count("\n") == 1


def test_script_runs_from_the_command_line(sweep, tmp_path):
    ok = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(sweep)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "| xnor" in ok.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and bad.stdout == "" and bad.stderr.strip().count("\n") == 0
