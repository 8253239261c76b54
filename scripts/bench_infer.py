"""Packed XNOR/popcount inference against fp32 torch and +-1 int8 (torch._int_mm): layers, and whole
networks run layer by layer and as fused whole-network plans (with their differing predictions
against the training-time network), ratios printed and written to JSON.
`python scripts/bench_infer.py [--reps N] [--skip-layers | --skip-networks]`.
The logic lives in bnn_train/bench/infer_speed.py."""

from bnn_train.bench.infer_speed import main

if __name__ == "__main__":
    raise SystemExit(main())
