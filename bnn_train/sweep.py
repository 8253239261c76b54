"""Sweep bookkeeping: every job's outcome in <sweep dir>/sweep_status.jsonl and a closing summary.

A Hydra callback, so it sees each job of `python train.py -m ...` whatever the launcher (local or
Slurm): failed jobs don't hide among the finished ones, and the sweep ends with what passed.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

STATUS_FILE = "sweep_status.jsonl"
_sweep_dir: Path | None = None  # the sweep this process launched, for `print_summary`


@dataclass
class JobFailure:
    """What a sweep job returns when it stopped on a user error (`cli.report_user_errors`): the job
    is recorded as failed without an exception, so the other jobs still run."""

    error: str
    exit_code: int


class SweepStatus(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        global _sweep_dir
        _sweep_dir = Path(config.hydra.sweep.dir)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        hc = HydraConfig.get()
        if hc.mode.name != "MULTIRUN":
            return
        value = job_return._return_value
        failed = job_return.status == JobStatus.FAILED or isinstance(value, JobFailure)
        lines = str(getattr(value, "error", value)).strip().splitlines() if failed else []
        record = {"job": hc.job.num, "dir": hc.runtime.output_dir, "overrides": list(hc.overrides.task),
                  "status": "failed" if failed else "completed",
                  "error": (lines[0] if lines else type(value).__name__) if failed else None,
                  "exit_code": getattr(value, "exit_code", 1) if failed else None}
        path = Path(hc.sweep.dir) / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one short line per job: appends from several jobs stay whole
            f.write(json.dumps(record) + "\n")


def print_summary(stream=sys.stderr) -> dict | None:
    """After a sweep in this process: how many jobs completed, and each failure on one line; returns
    the first failed job's record (None when all completed)."""
    global _sweep_dir
    if _sweep_dir is None:
        return None
    sweep_dir, _sweep_dir = _sweep_dir, None
    path = sweep_dir / STATUS_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    failed = [r for r in records if r["status"] == "failed"]
    print(f"sweep {sweep_dir}: {len(records) - len(failed)} of {len(records)} jobs completed"
          + (f", {len(failed)} failed:" if failed else ""), file=stream)
    for r in failed:
        print(f"  job {r['job']} ({' '.join(r['overrides'])}): {r['error']}", file=stream)
    print(f"compare: python scripts/compare.py {sweep_dir}", file=stream)
    return failed[0] if failed else None
