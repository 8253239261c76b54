"""Compare runs: `python scripts/compare.py multirun/2026-11-22/10-00-00 [more dirs] [--csv PATH]
[--out DIR] [--plot] [--runs]`.

Prints a Markdown table of every run below the folders, grouped over seeds, best mean accuracy
first; crashed and unfinished runs are listed below it. The logic lives in bnn_train/compare.py.
"""

from bnn_train.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
