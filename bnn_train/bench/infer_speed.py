"""Inference benchmark of the packed XNOR/popcount kernels: `python scripts/bench_infer.py`.

Layers: 3x3 convs with C_in = C_out = 64, 128, 256, 512 at CIFAR sizes (32, 16, 8, 4 px, batch
16) and ImageNet sizes (56, 28, 14, 7 px, batch 1), and a 4096 x 4096 linear layer (batch 64).
Each takes the same float activations and returns the +-1 product:
  fp32    sign, then torch's fp32 conv/matmul (channels_last)
  int8    sign to int8, im2col, torch._int_mm (int32)
  packed  pack_channels, then the XNOR/popcount kernel (int32)
Networks: XNOR ResNet-18, Bi-Real-18 and BNN ResNet-18 at 32 px, batch 1 and 64, channels_last
input: the fp32 full-precision twin against the exported packed network (real first/last layers
included), run whole-network (`load_packed`: BN, shortcut, activation and the next sign in the
kernels' epilogues, BN -> sign folded into thresholds where no shortcut or K intervenes) and layer
by layer (`fuse=False`: a float tensor between binary layers). BatchNorm statistics and thresholds
are randomized (seeded) so that signs flip, and each packed network's predictions are compared
with the training-time network's (`set_binary_precision("auto")`) on the timed batch. Runs
interleave after warm-up and report medians; ratios are printed and written to JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bnn_train.config  # noqa: F401  (registers the config schemas that compose() needs)
from bnn_train.binarize.product import _im2col
from bnn_train.binarize.transform import set_binary_precision
from bnn_train.deploy import kernels
from bnn_train.deploy.packed import export, kernel_weight, load_packed
from bnn_train.train.setup import build_network

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NETWORKS = [("resnet18", "xnor"), ("bireal18", "bireal"), ("resnet18", "bnn")]
CONV_CASES = [(16, 64, 32), (16, 128, 16), (16, 256, 8), (16, 512, 4),
              (1, 64, 56), (1, 128, 28), (1, 256, 14), (1, 512, 7)]


def median_times(fns: dict, reps: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def conv_case(batch: int, c: int, size: int, reps: int, ops) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3)
    w_pm1 = torch.where(w >= 0, 1.0, -1.0).contiguous(memory_format=torch.channels_last)
    # _im2col orders columns (c, kh, kw), as flatten(1) of [O, C, kh, kw]
    w_cols = torch.where(w >= 0, 1, -1).to(torch.int8).reshape(c, -1).t().contiguous()
    bits = kernel_weight(w >= 0)
    impl = kernels.IMPLS[kernels.best_impl()]

    def int8():
        cols, _ = _im2col(torch.where(x >= 0, 1, -1).to(torch.int8), (3, 3), (1, 1), (1, 1), (1, 1))
        return torch._int_mm(cols, w_cols)

    fns = {"fp32": lambda: F.conv2d(torch.where(x >= 0, 1.0, -1.0), w_pm1, padding=1), "int8": int8,
           "packed": lambda: ops.binary_conv(ops.pack_channels(x, impl), bits, c, 3, 3, 1, 1, 1, 1, 1, 1, impl)}
    t = median_times(fns, reps)
    return {"case": f"conv3x3 C={c} {size}px b={batch}", **{f"{k}_ms": v * 1e3 for k, v in t.items()},
            "fp32/packed": t["fp32"] / t["packed"], "int8/packed": t["int8"] / t["packed"]}


def linear_case(reps: int, ops, batch: int = 64, n: int = 4096) -> dict:
    torch.manual_seed(0)
    x, w = torch.randn(batch, n), torch.randn(n, n)
    w_pm1 = torch.where(w >= 0, 1.0, -1.0)
    w_i8 = torch.where(w >= 0, 1, -1).to(torch.int8).t().contiguous()
    bits = kernel_weight((w >= 0)[:, :, None, None])
    impl = kernels.IMPLS[kernels.best_impl()]
    fns = {"fp32": lambda: torch.where(x >= 0, 1.0, -1.0) @ w_pm1.t(),
           "int8": lambda: torch._int_mm(torch.where(x >= 0, 1, -1).to(torch.int8), w_i8),
           "packed": lambda: ops.binary_conv(ops.pack_channels(x[:, :, None, None], impl), bits, n, 1, 1, 1, 1, 0, 0, 1, 1,
                                             impl)}
    t = median_times(fns, reps)
    return {"case": f"linear {n}x{n} b={batch}", **{f"{k}_ms": v * 1e3 for k, v in t.items()},
            "fp32/packed": t["fp32"] / t["packed"], "int8/packed": t["int8"] / t["packed"]}


def randomize_statistics_(net: torch.nn.Module, seed: int = 0) -> None:
    """BatchNorm statistics and affine, RSign thresholds and RPReLU shifts as training leaves them
    roughly, instead of the initial mean 0, var 1 that make every BN an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.25)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
            for name in ("threshold", "gamma", "zeta"):
                p = getattr(m, name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def network_case(model: str, method: str, batch: int, reps: int) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"method={method}"])
        fp_cfg = compose("train", overrides=[f"model={model}", "method=fp"])
    torch.manual_seed(0)
    fp_net = build_network(fp_cfg, 3, 10, 32)[0].eval().to(memory_format=torch.channels_last)
    net = build_network(cfg, 3, 10, 32)[0].eval()
    randomize_statistics_(net)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = export(net, OmegaConf.to_container(cfg, resolve=True), (3, 32, 10), Path(tmp) / "m.bnn")
        packed = load_packed(Path(tmp) / "m.bnn")
        layerwise = load_packed(Path(tmp) / "m.bnn", fuse=False)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    set_binary_precision(net, "auto", "bf16", torch.device("cpu"))  # the training-time forward
    with torch.no_grad():
        ref, out, out_layerwise = net(x), packed(x), layerwise(x)
        t = median_times({"fp32": lambda: fp_net(x), "layerwise": lambda: layerwise(x), "packed": lambda: packed(x)},
                         reps)
    summary = packed.summary("nhwc") if hasattr(packed, "summary") else {}
    return {"case": f"{model}/{method} b={batch}", "fp32_ms": t["fp32"] * 1e3, "layerwise_ms": t["layerwise"] * 1e3,
            "packed_ms": t["packed"] * 1e3, "fp32/packed": t["fp32"] / t["packed"],
            "fp32/layerwise": t["fp32"] / t["layerwise"],
            "differing_predictions": int((out.argmax(1) != ref.argmax(1)).sum()),
            "differing_predictions_layerwise": int((out_layerwise.argmax(1) != ref.argmax(1)).sum()),
            "logits_identical": bool(torch.equal(out, ref) and torch.equal(out_layerwise, ref)),
            "size_ratio": sizes["fp32_model_bytes"] / sizes["packed_bytes"], "plan": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions; medians are reported")
    p.add_argument("--skip-networks", action="store_true", help="layers only")
    p.add_argument("--skip-layers", action="store_true", help="networks only")
    p.add_argument("--json", default="bench_infer.json")
    args = p.parse_args(argv)
    ops = kernels.load()
    if ops is None:
        raise SystemExit("error: the C++ kernels could not be built (see the warning above); install g++ and ninja")
    print(f"kernels: {kernels.best_impl()}, torch threads: {torch.get_num_threads()}")
    layers = [] if args.skip_layers else \
        [conv_case(b, c, s, args.reps, ops) for b, c, s in CONV_CASES] + [linear_case(args.reps, ops)]
    print("\n| layer | fp32 ms | int8 ms | packed ms | fp32/packed | int8/packed |\n|---|---|---|---|---|---|")
    for r in layers:
        print(f"| {r['case']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['packed_ms']:.2f} | "
              f"{r['fp32/packed']:.1f}x | {r['int8/packed']:.1f}x |")
    networks = []
    if not args.skip_networks:
        for model, method in NETWORKS:
            for batch in (1, 64):
                networks.append(network_case(model, method, batch, max(3, args.reps // 2)))
        print("\n| network | fp32 ms | layer by layer ms | whole network ms | fp32/layer by layer | "
              "fp32/whole network | differing predictions | fp32 size / packed size |\n|---|---|---|---|---|---|---|---|")
        for r in networks:
            print(f"| {r['case']} | {r['fp32_ms']:.1f} | {r['layerwise_ms']:.1f} | {r['packed_ms']:.1f} | "
                  f"{r['fp32/layerwise']:.2f}x | {r['fp32/packed']:.2f}x | {r['differing_predictions']} / "
                  f"{r['differing_predictions_layerwise']}{'' if r['logits_identical'] else ' (logits differ)'} | "
                  f"{r['size_ratio']:.1f}x |")
        for model, method in NETWORKS:
            plan = next(r["plan"] for r in networks if r["case"].startswith(f"{model}/{method} "))
            print(f"{model}/{method}: {plan}")
    Path(args.json).write_text(json.dumps({"kernels": kernels.best_impl(), "layers": layers, "networks": networks},
                                          indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0
