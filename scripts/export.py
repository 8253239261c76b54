"""Export a trained run as a packed 1-bit model: `python scripts/export.py RUN_DIR --out model.bnn
[--check --data-root ROOT]`. The logic lives in bnn_train/deploy/export.py."""

from bnn_train.deploy.export import main

if __name__ == "__main__":
    raise SystemExit(main())
