"""Training-step benchmark: `python scripts/bench_train.py [--models ...] [--schemes ...]`.

For each (model, scheme) it times full training steps (forward, loss, backward, optimizer step,
latent clipping) of four variants, built from the same Hydra configs as `train.py`; all but the
research baseline run the trainer's own `train_step`:

  binary    the binarized network on the fast path: exact +-1 products (`trainer.binary_precision=auto`),
            bf16 gradients of those products, channels_last, the framework's on-device loader
  fp32      the same architecture with method=fp, fp32, default memory layout
  fp_policy method=fp under the same policy as `binary` (channels_last, same autocast, same compile)
  research  a research-code-style binarized network: torch.sign in forward with the gradient
            passed straight through, latent weights swapped in and out of `.data` around every
            step, fp32 (the pattern of the public BinaryNet/XNOR-Net PyTorch ports)

Variants run interleaved in one process after warm-up, round by round, so that load changes on a
noisy machine hit all of them alike; each reports the median step time over rounds. Ratios:
binary/fp32, binary/fp_policy, research/binary. Memory: on CUDA the peak allocated; on the CPU the
bytes of parameters, gradients, optimizer state and the tensors autograd saves for backward
(the part of peak memory that differs between variants).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from bnn_train.binarize.scaling import SignWeight
from bnn_train.binarize.transform import set_binary_precision
from bnn_train.data import build_data
from bnn_train.train.cpu_memory import keep_freed_memory
from bnn_train.train.optim import build_optimizer
from bnn_train.models import build_model
from bnn_train.train.setup import activation_for, binary_weights, build_network
from bnn_train.train.step import StepParts, train_step

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VARIANTS = ("binary", "fp32", "fp_policy", "research")
# Per model: input (channels, size), default batch, config overrides. mlp is BinaryNet's MNIST MLP
# (3 x 4096, batch 100); the convnets take CIFAR-sized inputs.
MODELS = {"mlp": (1, 28, 100, ["model.width=4096"]), "resnet20": (3, 32, 128, []),
          "resnet18": (3, 32, 32, []), "bireal18": (3, 32, 32, [])}
DEFAULT_SCHEMES = {"mlp": ["bnn", "xnor"], "resnet20": ["bnn", "xnor", "bireal"],
                   "resnet18": ["bnn", "xnor", "bireal"], "bireal18": ["bireal", "reactnet"]}


def compose_config(model: str, method: str, batch: int, overrides: list[str]) -> object:
    channels, size, _, model_overrides = MODELS[model]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[
            f"model={model}", f"method={method}", "data=synthetic", f"data.channels={channels}",
            f"data.image_size={size}", f"data.batch_size={batch}", f"data.train_size={batch * 8}",
            "data.val_size=64", *model_overrides, *overrides])


# ---- research-code-style baseline ---------------------------------------------------------------


class _ResearchBinary:
    """Mixin reproducing the common port: weights replaced in `.data` by sign (times mean|W| for
    scaled schemes) before forward, the latent copy kept in `weight.org`; inputs signed in place."""

    binarize_input: bool = False
    scaled: bool = False

    def _binary_weight(self):
        if not hasattr(self.weight, "org"):
            self.weight.org = self.weight.data.clone()
        w = self.weight.org.sign()
        if self.scaled:
            w = w * self.weight.org.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        self.weight.data = w
        return self.weight

    def _binary_input(self, x):
        if self.binarize_input:
            x.data = x.data.sign()
        return x


class ResearchConv2d(_ResearchBinary, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self._binary_input(x), self._binary_weight(), self.bias)


class ResearchLinear(_ResearchBinary, nn.Linear):
    def forward(self, x):
        return F.linear(self._binary_input(x), self._binary_weight(), self.bias)


def research_network(cfg, shape: tuple[int, int, int]) -> nn.Module:
    """The architecture of `cfg` with seed-0 weights (those of the binarized variant), its
    binarized layers turned into research-style ones: same layers, inputs and scaling as the
    scheme binarizes, learned from a probe built by the framework."""
    torch.manual_seed(0)
    net = build_model(cfg.model, *shape, activation_for(cfg))
    probe, binarized = build_network(cfg, *shape)
    for name in binarized:
        layer, ours = net.get_submodule(name), probe.get_submodule(name)
        layer.__class__ = ResearchConv2d if isinstance(layer, nn.Conv2d) else ResearchLinear  # same parameters
        layer.binarize_input = ours.input_quantizer is not None
        layer.scaled = not isinstance(ours.weight_quantizer, SignWeight)
    return net


def research_step(model, optimizer, x, y, bound: float | None):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in model.parameters():  # the latent weights go back in before the update...
        if hasattr(p, "org"):
            p.data.copy_(p.org)
    optimizer.step()
    for p in model.parameters():  # ...and are clipped and stored again after it
        if hasattr(p, "org"):
            if bound is not None:
                p.data.clamp_(-bound, bound)
            p.org.copy_(p.data)
    return loss


# ---- variants ------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    layout: torch.memory_format
    autocast: object
    bound: float | None
    research: bool = False
    times: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    memory: int = 0

    def __post_init__(self):
        # The trainer's step, timed without a schedule or running sums: the research baseline has neither
        self.parts = StepParts(model=self.model, optimizer=self.optimizer, clip=self.bound, autocast=self.autocast,
                               layout=self.layout)

    def step(self, x, y):
        if self.research:
            x = x.contiguous(memory_format=self.layout) if x.dim() == 4 else x
            return research_step(self.model, self.optimizer, x, y, self.bound)
        return train_step(self.parts, x, y)[0]


def build_variants(model: str, scheme: str, batch: int, device: torch.device, precision: str,
                   compile_model: bool) -> tuple[list[Variant], object]:
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    cfg = compose_config(model, scheme, batch, [f"trainer.precision={precision}"])
    fp_cfg = compose_config(model, "fp", batch, [])
    data = build_data(cfg.data, device=device, seed=0)
    shape = (data.in_channels, data.num_classes, data.image_size)
    variants = []

    def add(name, net, cfg_, layout, ctx, research=False, compiled=False):
        torch.manual_seed(0)
        net.to(device)
        if layout == torch.channels_last:
            net.to(memory_format=torch.channels_last)
        opt = build_optimizer(net, cfg_.optim, binary_weights(net) if not research else [])
        module = torch.compile(net) if compiled else net
        bound = cfg_.method.clip_latent if cfg_.method.name != "fp" else None
        variants.append(Variant(name, module, opt, layout, ctx(), bound, research))

    torch.manual_seed(0)
    net = build_network(cfg, *shape)[0]
    set_binary_precision(net, "auto", "bf16", device)
    add("binary", net, cfg, torch.channels_last, autocast, compiled=compile_model)
    torch.manual_seed(0)
    add("fp32", build_network(fp_cfg, *shape)[0], fp_cfg, torch.contiguous_format, nullcontext)
    torch.manual_seed(0)
    add("fp_policy", build_network(fp_cfg, *shape)[0], fp_cfg, torch.channels_last, autocast, compiled=compile_model)
    add("research", research_network(cfg, shape), cfg, torch.contiguous_format, nullcontext, research=True)
    return variants, data


def measure_memory(variant: Variant, x, y, device: torch.device) -> int:
    """Peak CUDA memory of one step, or on the CPU the bytes held across it (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        variant.step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        variant.step(x, y)
    state = sum(t.numel() * t.element_size() for s in variant.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    params = sum(p.numel() * p.element_size() for p in variant.model.parameters())
    return sum(saved) + 2 * params + state  # params and their gradients


def run_case(model: str, scheme: str, args, device: torch.device) -> dict:
    batch = args.batch or MODELS[model][2]
    variants, data = build_variants(model, scheme, batch, device, args.precision, args.compile)
    loader = data.train
    loader.set_epoch(0)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x, y = next_batch()
    for v in variants:
        for _ in range(args.warmup):
            v.step(x, y)
        v.memory = measure_memory(v, x, y, device)
    for _ in range(args.rounds):
        for v in variants:
            sync()
            wait = 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t1 = time.perf_counter()
                xb, yb = next_batch()
                sync()
                wait += time.perf_counter() - t1
                v.step(xb, yb)
            sync()
            v.times.append((time.perf_counter() - t0) / args.steps)
            v.wait.append(wait / args.steps)
    result = {"model": model, "scheme": scheme, "batch": batch, "device": str(device), "variants": {}}
    for v in variants:
        step = statistics.median(v.times)
        result["variants"][v.name] = {"step_s": step, "samples_per_s": batch / step,
                                      "data_wait_share": statistics.median(v.wait) / step, "memory_bytes": v.memory}
    r = result["variants"]
    result["ratios"] = {"binary/fp32": r["binary"]["step_s"] / r["fp32"]["step_s"],
                        "binary/fp_policy": r["binary"]["step_s"] / r["fp_policy"]["step_s"],
                        "research/binary": r["research"]["step_s"] / r["binary"]["step_s"],
                        "memory binary/fp32": r["binary"]["memory_bytes"] / r["fp32"]["memory_bytes"]}
    return result


def mnist_epoch(root: str, width: int, batch: int, device: torch.device) -> dict:
    """One epoch of BinaryNet's MNIST MLP (3 x width, batch `batch`) on the real data, trained by
    the framework's fast path and by the research-code-style fp32 implementation from the same
    initial weights; returns each one's wall time and validation accuracy after the epoch."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        # cross-entropy and one lr for all weights, as the research-style baseline trains
        cfg = compose("train", overrides=["experiment=binarynet_mnist", f"data.root={root}", f"model.width={width}",
                                          f"data.batch_size={batch}", "trainer.progress=false", "loss=cross_entropy",
                                          "optim.latent_lr_scale=none"])
    data = build_data(cfg.data, device=device, seed=0)
    shape = (data.in_channels, data.num_classes, data.image_size)
    out = {"width": width, "batch": batch, "device": str(device)}
    for kind in ("research", "binary"):
        if kind == "research":
            net, layout = research_network(cfg, shape), torch.contiguous_format
        else:
            torch.manual_seed(0)
            net, layout = build_network(cfg, *shape)[0], torch.channels_last
            set_binary_precision(net, "auto", "bf16", device)
        net.to(device)
        opt = build_optimizer(net, cfg.optim, [] if kind == "research" else binary_weights(net))
        v = Variant(kind, net, opt, layout, nullcontext(), cfg.method.clip_latent, research=kind == "research")
        data.train.set_epoch(0)
        net.train()
        t0 = time.perf_counter()
        for x, y in data.train:
            v.step(x, y)
        elapsed = time.perf_counter() - t0
        net.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in data.val:
                correct += (net(x).argmax(1) == y).sum().item()
                seen += y.numel()
        out[kind] = {"epoch_s": elapsed, "val_acc": correct / seen}
    out["speedup"] = out["research"]["epoch_s"] / out["binary"]["epoch_s"]
    return out


def table(results: list[dict]) -> str:
    head = ("| model | scheme | batch | binary samples/s | fp32 samples/s | binary/fp32 | binary/fp_policy | "
            "research/binary | data wait | memory binary/fp32 |")
    rows = [head, "|" + "---|" * 10]
    for r in results:
        v, q = r["variants"], r["ratios"]
        rows.append(f"| {r['model']} | {r['scheme']} | {r['batch']} | {v['binary']['samples_per_s']:.0f} | "
                    f"{v['fp32']['samples_per_s']:.0f} | {q['binary/fp32']:.2f} | {q['binary/fp_policy']:.2f} | "
                    f"{q['research/binary']:.2f} | {100 * v['binary']['data_wait_share']:.1f} % | "
                    f"{q['memory binary/fp32']:.2f} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,resnet20,resnet18,bireal18", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--schemes", default=None, help="comma-separated methods (default: a set per model)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per model)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="autocast of the real layers for binary and fp_policy")
    p.add_argument("--compile", action="store_true", help="torch.compile binary and fp_policy")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's defaults (the trainer's trainer.keep_cpu_memory=false)")
    p.add_argument("--json", default="bench_train.json", help="where to write the results")
    p.add_argument("--mnist-epoch", metavar="ROOT", default=None,
                   help="also time one epoch of BinaryNet's MNIST MLP on the MNIST data under ROOT")
    p.add_argument("--mnist-width", type=int, default=6144, help="hidden width for --mnist-epoch")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.system_malloc:
        keep_freed_memory()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"error: --models {','.join(unknown)}: choose from {', '.join(MODELS)}")
    results = []
    for model in models:
        for scheme in (args.schemes.split(",") if args.schemes else DEFAULT_SCHEMES[model]):
            results.append(run_case(model, scheme, args, device))
            r = results[-1]
            print(f"{model}/{scheme}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()), flush=True)
    print()
    print(table(results))
    epoch = None
    if args.mnist_epoch:
        epoch = mnist_epoch(args.mnist_epoch, args.mnist_width, 64, device)
        print(f"\nMNIST MLP 3x{epoch['width']}, batch 64, one epoch: research-style fp32 "
              f"{epoch['research']['epoch_s']:.1f} s ({100 * epoch['research']['val_acc']:.2f} %), fast path "
              f"{epoch['binary']['epoch_s']:.1f} s ({100 * epoch['binary']['val_acc']:.2f} %): "
              f"{epoch['speedup']:.2f}x faster")
    Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "args": vars(args),
                                           "results": results, "mnist_epoch": epoch}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0
