"""Model summary of a (binarized) network: parameters, operations and size per layer and in total.

Counting conventions (those of the BNN papers, so numbers compare with their tables):

- A layer's weights are *binary* when it has a `weight_quantizer`; everything else that is an
  nn.Parameter (bias, real weights, learnable parameters inside quantizers) is *real*.
  Buffers (BatchNorm running mean/var, fixed filters) are not parameters and are not counted.
- MACs (multiply-accumulates) per sample, one forward pass with batch 1:
      conv:   H_out * W_out * C_out * (C_in / groups) * kh * kw
      linear: in_features * out_features
  i.e. output elements x fan-in, summed over every call of the layer.
- BOPs = MACs of layers whose weights AND inputs are binary (sign(x) * sign(W) runs as
  XNOR-popcount); FLOPs = all other conv/linear MACs: real layers, and binary-weight layers with
  real inputs (BinaryConnect, BWN, the first layer of BinaryNet). As in the papers, a "FLOP" is one
  MAC, and BatchNorm, activations, scaling factors (alpha, K) and additions are not counted.
- OPs = BOPs / 64 + FLOPs: a 64-bit CPU does 64 binary MACs per XNOR-popcount instruction.
  Rastegari et al. 2016, "XNOR-Net" (efficiency analysis: up to 64 binary operations per clock);
  Liu et al. 2018, "Bi-Real Net" (memory usage and FLOPs comparison: FLOPs = real multiplications
  + 1/64 of the 1-bit ones); Liu et al. 2020, "ReActNet" (same OPs in its comparison tables).
- Size: binary weights take 1 bit, every other parameter 32 bits (packed), against 32 bits for
  every parameter (fp32). MB = 10^6 bytes, like the papers' memory figures (Bi-Real Net reports
  Mbit = 8 x MB, e.g. 374.1 Mbit for the 11.69 M fp32 parameters of ResNet-18).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

BITS_PER_FLOAT = 32
BOPS_PER_OP = 64  # binary MACs one 64-bit XNOR-popcount instruction performs


@dataclass
class LayerRow:
    """One conv/linear layer (or the "other" row: parameters outside conv/linear layers)."""

    name: str
    kind: str  # "conv" | "linear" | "other"
    weight_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None  # per sample; None: not called in the forward pass
    binary_weights: bool
    binary_inputs: bool
    binary_params: int
    real_params: int
    binary_macs: int
    float_macs: int

    @property
    def packed_bytes(self) -> float:
        """binary / 8 + real * 4."""
        return self.binary_params / 8 + self.real_params * BITS_PER_FLOAT / 8

    @property
    def bits(self) -> str:
        """W/A bit widths, e.g. "1/1" (XNOR-popcount), "1/32" (binary weights, real inputs)."""
        if self.kind == "other":
            return "-"
        return f"{1 if self.binary_weights else 32}/{1 if self.binary_inputs else 32}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape) if self.weight_shape is not None else None
        d["out_shape"] = list(self.out_shape) if self.out_shape is not None else None
        d["packed_bytes"] = self.packed_bytes
        d["bits"] = self.bits
        return d


@dataclass
class ModelSummary:
    """Per-layer rows and model totals; see the module docstring for the conventions."""

    input_shape: tuple[int, int, int]
    rows: list[LayerRow]
    totals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able: {"input_shape", "rows", "totals"}."""
        return {"input_shape": list(self.input_shape), "rows": [r.to_dict() for r in self.rows],
                "totals": dict(self.totals)}

    def to_markdown(self) -> str:
        """A GitHub-style table (renders in TensorBoard's text tab) followed by a totals block."""
        head = ["layer", "kind", "W/A bits", "weight", "output", "binary params", "real params",
                "BOPs", "FLOPs", "packed bytes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---"] * 3 + ["---:"] * 5) + "|"]
        for r in self.rows:
            out = _shape(r.out_shape) if r.out_shape is not None else ("-" if r.kind == "other" else "not called")
            lines.append("| " + " | ".join([
                f"`{r.name}`" if r.kind != "other" else r.name, r.kind, r.bits, _shape(r.weight_shape), out,
                f"{r.binary_params:,}", f"{r.real_params:,}", f"{r.binary_macs:,}", f"{r.float_macs:,}",
                f"{r.packed_bytes:,.0f}"]) + " |")
        t = self.totals
        c, h, w = self.input_shape
        lines += [
            "",
            f"**Totals** (input {c}x{h}x{w}, batch 1; parameters only, buffers such as BatchNorm "
            "running stats not counted)",
            "",
            f"- parameters: {t['binary_params']:,} binary + {t['real_params']:,} real = {t['params']:,}",
            f"- BOPs (binary MACs, XNOR-popcount): {t['bops']:,}",
            f"- FLOPs (real MACs): {t['flops']:,}",
            f"- OPs = BOPs/64 + FLOPs: {t['ops']:,.0f}",
            f"- size: {t['size_packed_mb']:.4f} MB packed (1 bit per binary weight, 32 per real parameter) "
            f"vs {t['size_fp32_mb']:.4f} MB fp32: {t['compression']:.2f}x smaller",
        ]
        return "\n".join(lines) + "\n"


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelSummary:
    """Summarize `model` for one input of shape (C, H, W).

    Runs one forward pass on zeros of shape [1, C, H, W] (zeros, not random: the summary must not
    advance the RNG of a seeded run) in eval mode under no_grad, with forward hooks on every
    nn.Conv2d / nn.Linear to read output sizes. Every module's train/eval flag is restored.
    """
    params = list(model.parameters())  # deduplicated: tied weights count once in the totals
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    calls: dict[str, list[torch.Size]] = {n: [] for n, _ in layers}

    def hook(name):
        def record(module, inputs, output):
            calls[name].append(output.shape)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    modes = {m: m.training for m in model.modules()}  # per module: some may be frozen in eval on purpose
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    rows, seen, binary_ids = [], set(), set()
    for name, m in layers:
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        binary_weights, binary_inputs = wq is not None, iq is not None
        layer_params = list(m.parameters())  # includes quantizer / scale parameters
        seen.update(id(p) for p in layer_params)
        n_binary = m.weight.numel() if binary_weights else 0
        if binary_weights:
            binary_ids.add(id(m.weight))
        fan_in = m.weight[0].numel()  # (C_in / groups) * kh * kw, or in_features
        macs = sum(s.numel() * fan_in for s in calls[name])  # output elements x fan-in, every call
        xnor = binary_weights and binary_inputs  # only then the MACs are XNOR-popcounts
        rows.append(LayerRow(
            name=name, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            weight_shape=tuple(m.weight.shape),
            out_shape=tuple(calls[name][-1][1:]) if calls[name] else None,
            binary_weights=binary_weights, binary_inputs=binary_inputs,
            binary_params=n_binary, real_params=sum(p.numel() for p in layer_params) - n_binary,
            binary_macs=macs if xnor else 0, float_macs=0 if xnor else macs))
    other = sum(p.numel() for p in params if id(p) not in seen)
    if other:
        rows.append(LayerRow("other (BN, activations, ...)", "other", None, None, False, False,
                             0, other, 0, 0))

    n_binary = sum(p.numel() for p in params if id(p) in binary_ids)
    n_all = sum(p.numel() for p in params)
    bops = sum(r.binary_macs for r in rows)
    flops = sum(r.float_macs for r in rows)
    packed = (n_binary + (n_all - n_binary) * BITS_PER_FLOAT) / 8 / 1e6
    fp32 = n_all * BITS_PER_FLOAT / 8 / 1e6
    totals = {
        "binary_params": n_binary, "real_params": n_all - n_binary, "params": n_all,
        "bops": bops, "flops": flops, "ops": bops / BOPS_PER_OP + flops,
        "size_packed_mb": packed, "size_fp32_mb": fp32, "compression": fp32 / packed if packed else 1.0,
    }
    return ModelSummary(tuple(input_shape), rows, totals)


def _shape(s: tuple[int, ...] | None) -> str:
    return "-" if s is None else "x".join(str(d) for d in s)
