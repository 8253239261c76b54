"""Training-step speed of binarized networks against their full-precision twins and a
research-code-style implementation: `python scripts/bench_train.py [--models mlp,resnet20]
[--schemes bnn,xnor] [--precision fp32|bf16] [--compile] [--json PATH]`.

Prints a table of samples/s and ratios measured in one run, and writes JSON. The logic lives in
bnn_train/bench/train_speed.py.
"""

from bnn_train.bench.train_speed import main

if __name__ == "__main__":
    raise SystemExit(main())
