"""`python scripts/export.py RUN_DIR_OR_CHECKPOINT --out model.bnn [--check --data-root ROOT]`.

Writes the packed model, prints its size against the fp32 weights and the checkpoint file, and
with --check evaluates the exported model with the packed engine and the training-time model on
the run's whole validation set, reporting both accuracies and every prediction that differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bnn_train.binarize.transform import set_binary_precision
from bnn_train.deploy import kernels
from bnn_train.deploy.packed import export, load_packed
from bnn_train.errors import CheckpointError, UserError
from bnn_train.train.checkpoint import load_checkpoint
from bnn_train.train.setup import build_network

# [channels, image_size, num_classes] of the fixed-size datasets, for checkpoints that predate the
# checkpoint key "input_shape" (which holds that triple, not a tensor shape).
KNOWN_INPUTS = {"cifar10": [3, 32, 10], "mnist": [1, 28, 10], "digits": [1, 8, 10]}


def resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CheckpointError(f"{path}: no checkpoints/best.pt or last.pt; pass a run directory or a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or run directory")
    return path


def load_trained(path: Path):
    """(model in eval mode, config dict, [channels, image_size, num_classes]) from a checkpoint written
    by the trainer (its key "input_shape" holds that triple)."""
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: has no run config; export needs a checkpoint written by train.py")
    dims = state.get("input_shape") or KNOWN_INPUTS.get(config["data"]["name"])
    if dims is None:
        raise CheckpointError(f"{path}: does not record its input channels, image size and classes "
                              f"(data={config['data']['name']}); resave it with a current train.py")
    channels, image_size, num_classes = dims
    cfg = OmegaConf.create(config)
    model, binarized = build_network(cfg, channels, num_classes, image_size, state.get("stage"))
    if not binarized:
        raise CheckpointError(f"{path}: method={config['method']['name']} binarizes no layer; nothing to pack")
    model.load_state_dict(state["model"])
    return model.eval(), config, dims


def check(model, packed, config, data_root: str | None) -> dict:
    """Both models over the whole validation split: accuracies and the number of differing predictions."""
    from bnn_train.data import build_data

    cfg = OmegaConf.create(config)
    if data_root is not None:
        cfg.data.root = data_root
    data = build_data(cfg.data, device=torch.device("cpu"), seed=0)
    set_binary_precision(model, "auto", "bf16", torch.device("cpu"))  # the trainer's default forward
    correct = {"training": 0, "packed": 0}
    differ = seen = 0
    with torch.no_grad():
        for x, y in data.val:
            a, b = model(x).argmax(1), packed(x).argmax(1)
            correct["training"] += (a == y).sum().item()
            correct["packed"] += (b == y).sum().item()
            differ += (a != b).sum().item()
            seen += y.numel()
    return {"images": seen, "differing_predictions": differ,
            "training_acc": correct["training"] / seen, "packed_acc": correct["packed"] / seen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a run directory (its checkpoints/best.pt) or a checkpoint file")
    p.add_argument("--out", type=Path, required=True, help="where to write the packed model")
    p.add_argument("--check", action="store_true", help="compare predictions on the run's validation set")
    p.add_argument("--data-root", default=None, help="data.root for --check (default: the run's)")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.source)
        model, config, dims = load_trained(ckpt)
        sizes = export(model, config, tuple(dims), args.out)
        ckpt_bytes = ckpt.stat().st_size
        print(f"wrote {args.out}: {sizes['packed_bytes'] / 1e6:.3f} MB "
              f"({sizes['binary_bits_bytes'] / 1e6:.3f} MB of weight bits); fp32 weights "
              f"{sizes['fp32_model_bytes'] / 1e6:.3f} MB ({sizes['fp32_model_bytes'] / sizes['packed_bytes']:.1f}x), "
              f"checkpoint file {ckpt_bytes / 1e6:.3f} MB ({ckpt_bytes / sizes['packed_bytes']:.1f}x)")
        packed = load_packed(args.out)
        plan = f", per binary layer: {packed.summary()}" if hasattr(packed, "summary") else ""
        print(f"loaded back: {type(packed).__name__}, kernels: {kernels.best_impl()}{plan}")
        if args.check:
            t0 = time.perf_counter()
            r = check(model, packed, config, args.data_root)
            print(f"check on {r['images']} validation images ({time.perf_counter() - t0:.1f} s): training-time "
                  f"{100 * r['training_acc']:.2f} %, packed {100 * r['packed_acc']:.2f} %, "
                  f"{r['differing_predictions']} predictions differ")
            return 0 if r["differing_predictions"] == 0 else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
