"""Whole-network packed inference: what follows each binary layer runs in its kernel's epilogue,
and a binary layer's signs go to the next one as packed bits.

The network is traced with torch.fx (binary layers as leaves). From every packed layer L the chain
L -> [BatchNorm] -> [+ real shortcut] -> [activation] is taken into L's epilogue when each step has
no other user. Its output then goes to the next packed layers as bits (the signs their quantizers
take, sign(v - t)), and as fp32 only where something else reads it (a shortcut, a real layer,
XNOR-Net's K, pooling, the classifier).

Folding (FINN, Umuroglu et al. 2017, sec. 4.2.2; Larq Compute Engine's fused output
transformation): without a shortcut, K or a real consumer, v is a function of L's integer sum P
alone. With y = gamma * (alpha * P - mu) / sigma + beta,
    sign(y) = sign(P - tau) if gamma * alpha > 0, else sign(tau - P),
with sign(0) = +1, so one integer comparison per channel, s_o * P >= tau_o, replaces the float
tail. tau is not taken from that formula in real arithmetic: the fp32 tail (the same ops and
roundings as the torch modules, checked against them here) is evaluated at every integer P in
[-n, n] (n = C_in * kh * kw), and tau is the exact place where its sign changes; a channel whose
sign does not change once, monotonically, leaves the layer unfolded.

Where a real shortcut is added between BatchNorm and the next sign (Bi-Real Net, ResNet blocks),
sign(v) depends on the shortcut's real value and no integer threshold exists; nor where the next
layer's XNOR-Net K(x) = box(mean_c |x|) scales its output, since K depends on x's real values.
There the epilogue computes v = fma(alpha * P [* K] [+ b], a, c) [+ shortcut], the activation
(hardtanh, ReLU, RPReLU, identity), the next layer's sign bits and, for a next layer with K,
mean_c |v| (summed in torch's order), in one pass with torch's fp32 roundings (BN's a and c are
read off the module, which torch evaluates as one fused multiply-add), and writes v only where a
later node reads it. Each chain is checked against its unfused torch modules when a plan is built;
any mismatch leaves that layer unfused. Layers with an affine output (ABC-Net) keep it in torch.

Memory formats: real tensors are written in the memory format the training-time network gives
the same tensor (recorded once by running it, `reference_formats`), so reductions downstream
(K's channel mean, pooling, the classifier) sum in the same order and every output is bit-identical.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_train.binarize.layers import BinaryConv2d, BinaryLinear
from bnn_train.binarize.product import memory_format
from bnn_train.deploy import kernels
from bnn_train.deploy.packed import PackedActivation, PackedBinaryConv2d, sign_threshold
from bnn_train.errors import CheckpointError
from bnn_train.models.activations import RPReLU

log = logging.getLogger(__name__)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FORMATS = ("nchw", "nhwc")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (BinaryConv2d, BinaryLinear, PackedBinaryConv2d, RPReLU)) or super().is_leaf_module(
            m, qualname)


def trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # data-dependent control flow and the like: the layer-by-layer engine runs it
        log.info("packed engine: %s does not trace with torch.fx (%s: %s); binary layers run one by one",
                 type(model).__name__, type(e).__name__, e)
        return None


def _probe(shape, fmt: str) -> Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" and x.dim() == 4 else x


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps, per node, (channels_last, shape) of every tensor it produces."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[str, tuple[bool, tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.seen[n.name] = (memory_format(out) == torch.channels_last, tuple(out.shape))
        return out


def reference_formats(model: nn.Module, input_chw: tuple[int, int, int]) -> dict | None:
    """{"nchw" | "nhwc": {node: (channels_last, shape)}}: the memory format and shape of every tensor
    of the training-time forward (`set_binary_precision(..., "auto", ...)`, the exact products) for
    a batch of 2 in each input format. None when the network does not trace."""
    from bnn_train.binarize.transform import set_binary_precision

    gm = trace(model)
    if gm is None:
        return None
    set_binary_precision(model, "auto", "bf16", torch.device("cpu"))
    out = {}
    with torch.no_grad():
        for fmt in FORMATS:
            rec = _Recorder(gm)
            rec.run(_probe((2, *input_chw), fmt))
            out[fmt] = rec.seen
    return out


# ---- the float tail: torch's roundings, checked against the modules -------------------------------


def _check_probes(channels: int, dims: tuple[int, ...]) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    probes = []
    for shape in [(5, channels, *dims)] + ([(3, channels, 4, 5)] if len(dims) == 2 else []):
        x = torch.randn(*shape, generator=g) * 4
        x.view(-1)[:7] = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 0.5])
        probes.append(x)
        if x.dim() == 4:
            probes.append(x.contiguous(memory_format=torch.channels_last))
    return probes


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def fma32(x: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """fp32 x * a + c rounded once (a fused multiply-add), exactly: x * a is exact in fp64, the
    fp64 sum's error is recovered by TwoSum (Knuth), and it decides the one case where rounding the
    fp64 sum to fp32 could go the wrong way, a sum that lands exactly halfway between two floats."""
    p = x.double() * a.double()
    cd = c.double().expand_as(p)
    s = p + cd
    bb = s - p
    err = (p - (s - bb)) + (cd - bb)
    r = s.float()
    d = s - r.double()
    toward = torch.nextafter(r, torch.where(d > 0, float("inf"), float("-inf")).float())
    tie = (d != 0) & ((r.double() + toward.double()) * 0.5 == s) & (err != 0)
    return torch.where(tie & ((err > 0) == (d > 0)), toward, r)


def bn_affine(bn: nn.Module, channels: int) -> tuple[Tensor, Tensor] | None:
    """(a, c) with BN(v) = fma(v, a, c) in fp32, as torch's eval-mode kernel computes it: a from
    BN(1) with the mean and shift zeroed, c = BN(0); checked against the module on random values in
    both memory formats. None for anything else (training mode, batch statistics)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None \
            or bn.num_features != channels:
        return None
    dims = (3, 5) if isinstance(bn, nn.BatchNorm2d) else ()
    with torch.no_grad():
        zeros = torch.zeros(1, channels, *([1] * len(dims)))
        a = F.batch_norm(zeros + 1, torch.zeros_like(bn.running_mean), bn.running_var, bn.weight,
                         None if bn.bias is None else torch.zeros_like(bn.bias), False, 0.0, bn.eps).flatten()
        c = bn(zeros).flatten()
        for x in _check_probes(channels, dims):
            if not torch.equal(bn(x), fma32(x, _per_channel(a, x), _per_channel(c, x))):
                log.info("packed engine: %s is not fma(v, a, c) in fp32 here; left unfused", bn)
                return None
    return a.contiguous(), c.contiguous()


def act_spec(act: nn.Module, channels: int) -> tuple[str, Tensor | None] | None:
    """The epilogue's form of an activation (kernels.ACTS and its parameters), checked against the
    module: identity, hardtanh / ReLU as clamp, RPReLU as PReLU(v - g) + z. None for others."""
    if isinstance(act, nn.Identity) or (isinstance(act, nn.Dropout) and not act.training):
        return "none", None
    if isinstance(act, nn.Hardtanh):
        spec = ("clamp", torch.tensor([act.min_val, act.max_val], dtype=torch.float32))
    elif isinstance(act, nn.ReLU):
        spec = ("clamp", torch.tensor([0.0, float("inf")]))
    elif isinstance(act, RPReLU) and act.gamma.numel() == channels:
        spec = ("shifted_prelu", torch.stack([act.gamma, act.beta, act.zeta]).detach().float().contiguous())
    else:
        return None
    with torch.no_grad():
        for x in _check_probes(channels, (3, 5)) + _check_probes(channels, ()):
            if not torch.equal(act(x.clone()), apply_act(x, *spec)):
                log.info("packed engine: %s differs from its epilogue form here; left unfused", act)
                return None
    return spec


def apply_act(v: Tensor, kind: str, params: Tensor | None) -> Tensor:
    """The epilogue's activation in torch ops, with the same roundings."""
    if kind == "clamp":
        return torch.minimum(torch.maximum(v, params[0]), params[1])
    if kind == "shifted_prelu":
        t = v - _per_channel(params[0], v)
        return torch.where(t > 0, t, _per_channel(params[1], v) * t) + _per_channel(params[2], v)
    return v


def fold_thresholds(layer: PackedBinaryConv2d, bn, act, threshold: Tensor | None) -> Tensor | None:
    """int32 [2, O] (s; tau) with sign(tail(P) - t) = +1 <=> s * P >= tau for every integer P in
    [-n, n], from the fp32 tail evaluated at all of them; None if some channel's sign is not a
    monotone step in P."""
    o = layer.out_channels
    n = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    alpha = None if layer.alpha is None else layer.alpha.expand(o)
    bias = None if layer.bias is None else layer.bias.detach().float()
    t = torch.zeros(o) if threshold is None else threshold
    total = 2 * n + 1
    ones = torch.zeros(o, dtype=torch.int64)
    steps = torch.zeros(o, dtype=torch.int64)
    first = last = None
    with torch.no_grad():
        for start in range(0, total, 1024):
            p = torch.arange(start - n, min(start + 1024, total) - n, dtype=torch.float32)[:, None].expand(-1, o)
            v = p if alpha is None else p * alpha
            if bias is not None:
                v = v + bias
            if bn is not None:
                v = fma32(v, bn[0], bn[1])
            if act is not None:
                v = apply_act(v, *act)
            bits = v >= t
            ones += bits.sum(0)
            if last is not None:
                steps += bits[0] != last
            steps += (bits[1:] != bits[:-1]).sum(0)
            first = bits[0] if first is None else first
            last = bits[-1]
    if bool((steps > 1).any()):
        return None
    s = torch.ones(o, dtype=torch.int64)
    tau = torch.where(first, INT32_MIN, INT32_MAX)           # constant +1 / constant -1 (no P reaches tau)
    up, down = (steps == 1) & ~first, (steps == 1) & first
    tau = torch.where(up, (total - ones) - n, tau)           # zeros then ones: the first P with +1
    s = torch.where(down, -1, s)
    tau = torch.where(down, -((ones - 1) - n), tau)          # ones then zeros: P <= last P with +1
    return torch.stack([s, tau]).to(torch.int32).contiguous()


# ---- a packed layer and its epilogue -------------------------------------------------------------


class PackedChain(nn.Module):
    """A packed layer with the BatchNorm, shortcut addition, activation and next sign that follow it
    in its kernel's epilogue. forward(x, [shortcut]) -> the real output (a tensor), or a
    PackedActivation whose bits are sign(v - t) for the next packed layers (and whose `real` is v
    where other nodes read it, `abs_mean` mean_c |v| where the next layers' K needs only that).
    With `fold`, the bits come from integer thresholds on P alone."""

    def __init__(self, layer: PackedBinaryConv2d, bn=None, residual: bool = False, act=None, real: str | None = None,
                 bits: bool = False, threshold: Tensor | None = None, fold: Tensor | None = None,
                 abs_mean: bool = False):
        super().__init__()
        self.layer, self.residual, self.real, self.bits, self.abs_mean = layer, residual, real, bits, abs_mean
        self.act = "none" if act is None else act[0]
        self.register_buffer("bn_mul", None if bn is None else bn[0])
        self.register_buffer("bn_add", None if bn is None else bn[1])
        self.register_buffer("act_params", None if act is None else act[1])
        self.register_buffer("threshold", threshold)
        self.register_buffer("fold", fold)

    def extra_repr(self) -> str:
        steps = ["fold" if self.fold is not None else "alpha" + ("*K" if self.layer.act_scale is not None else "")]
        if self.fold is None:
            steps += [s for s, on in (("bn", self.bn_mul is not None), ("+shortcut", self.residual),
                                      (self.act, self.act != "none")) if on]
        out = [f"real={self.real}"] if self.real else []
        out += ["bits" + ("(x - t)" if self.threshold is not None else "")] if self.bits else []
        out += ["mean|v|"] if self.abs_mean else []
        return f"{' -> '.join(steps)}; out: {', '.join(out)}"

    def forward(self, x, residual: Tensor | None = None):
        if self.real is None and not self.bits:
            return self.layer(x)  # no recorded format: the layer's own (its input's)
        epilogue = {}
        if self.fold is not None:
            epilogue = {"fold": self.fold, "bits": True}
        elif self.bn_mul is not None or self.residual or self.act != "none" or self.bits:
            if residual is not None:
                residual = self.layer.as_image(residual)
            epilogue = {"bn": None if self.bn_mul is None else (self.bn_mul, self.bn_add), "residual": residual,
                        "act": self.act, "act_params": self.act_params, "threshold": self.threshold,
                        "bits": self.bits, "abs_mean": self.abs_mean}
        y, bits, abs_mean = self.layer.product(x, self.real, **epilogue)
        if bits is None:
            return y
        return PackedActivation(bits, self.layer.out_channels, y, abs_mean)

    def unfused(self, x: Tensor, residual: Tensor | None, steps: list) -> PackedActivation:
        """v, its bits and mean_c |v| from the torch modules the chain replaces (`steps`: modules, and
        "add" for the shortcut): the check of `forward`."""
        layer = self.layer
        v = layer._torch_tail(layer._sign_product(x), x, "nhwc" if self.abs_mean else (self.real or "nchw"))
        for step in steps:
            v = v + residual if isinstance(step, str) else step(v)
        pre = v if self.threshold is None else v - _per_channel(self.threshold, v)
        bits = kernels.load().pack_channels(layer.as_image(pre).float(), kernels.resolve_impl(None))
        mean = layer.as_image(v.abs().mean(dim=1, keepdim=True)) if self.abs_mean else None
        return PackedActivation(bits, layer.out_channels, v, mean)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2 and not n.kwargs
            and all(isinstance(a, fx.Node) for a in n.args))


def _packed(gm: fx.GraphModule, n: fx.Node) -> PackedBinaryConv2d | None:
    if n.op != "call_module":
        return None
    m = gm.get_submodule(n.target)
    return m if isinstance(m, PackedBinaryConv2d) else None


def compile_plan(model: nn.Module, formats: dict[str, tuple[bool, tuple[int, ...]]]) -> fx.GraphModule | None:
    """The model's graph with every packed layer replaced by a PackedChain (see the module docstring)."""
    gm = trace(model)
    if gm is None:
        return None
    graph = gm.graph
    formats = dict(formats)  # grows with the nodes added here, which stand for the chains' last nodes
    erased: set[fx.Node] = set()
    for count, node in enumerate([n for n in graph.nodes if _packed(gm, n) is not None]):
        if node in erased:
            continue
        chain = _build_chain(gm, node, _packed(gm, node), formats)
        name = f"packed_chain_{count}"
        gm.add_submodule(name, chain.module)
        last = chain.nodes[-1]
        with graph.inserting_after(last):
            new = graph.call_module(name, (node.args[0],) + ((chain.residual,) if chain.residual is not None else ()))
        real_node = new
        if chain.module.bits and chain.module.real:
            with graph.inserting_after(new):
                real_node = graph.call_function(getattr, (new, "real"))
        if last.name in formats:
            formats[new.name] = formats[real_node.name] = formats[last.name]
        for user in list(last.users):
            if user is not new and user is not real_node:
                bits = chain.module.bits and user in chain.bit_users
                user.replace_input_with(last, new if bits or not chain.module.bits else real_node)
        for n in reversed(chain.nodes):
            graph.erase_node(n)
            erased.add(n)
    graph.lint()
    gm.recompile()
    return gm


class _Chain:
    def __init__(self, module: PackedChain, nodes: list[fx.Node], residual: fx.Node | None, bit_users: list):
        self.module, self.nodes, self.residual, self.bit_users = module, nodes, residual, bit_users


def _format(formats, n: fx.Node) -> str | None:
    seen = formats.get(n.name)
    return None if seen is None else ("nhwc" if seen[0] else "nchw")


def _build_chain(gm: fx.GraphModule, node: fx.Node, layer: PackedBinaryConv2d, formats) -> _Chain:
    """The longest chain from `node` whose fused form matches its modules; the layer alone else."""
    o = layer.out_channels
    alone = _Chain(PackedChain(layer, real=_format(formats, node)), [node], None, [])
    if layer.affine is not None or kernels.load() is None or node.name not in formats \
            or node.args[0].name not in formats:
        return alone  # the affine output runs in torch on the int32 sums
    nodes, steps, bn, act, residual = [node], [], None, None, None
    cur = node
    while len(cur.users) == 1 and act is None:
        user = next(iter(cur.users))
        if user.name not in formats:
            break
        m = gm.get_submodule(user.target) if user.op == "call_module" else None
        if m is not None and bn is None and residual is None and (spec := bn_affine(m, o)) is not None:
            bn = spec
        elif m is not None and (spec := act_spec(m, o)) is not None:
            act = spec
        elif _is_add(user) and residual is None and user.args[0] is not user.args[1] \
                and formats[user.name][1] == formats[cur.name][1]:
            residual = user.args[1] if user.args[0] is cur else user.args[0]
            if residual.name not in formats:
                break
            m = "add"
        else:
            break
        steps.append(m)
        nodes.append(user)
        cur = user
    # Readers of the output: the next packed layers take the bits of sign(v - t) (one t for all of
    # them); a packed layer with XNOR-Net's K also mean_c |v| (channels_last v, K checked), or v;
    # everything else reads the real v.
    fmt = _format(formats, cur)
    mean_ok = (fmt == "nhwc" or len(formats[cur.name][1]) == 2) and kernels.aten_lanes() > 0
    readers_real, abs_mean, bit_users, threshold = False, False, [], None
    for user in cur.users:
        consumer = _packed(gm, user)
        if consumer is not None and user.args[0] is cur:
            try:
                t = sign_threshold(consumer.input_quantizer)
            except CheckpointError:  # not a sign: the consumer packs its own input
                t = False
            if t is not False and (not bit_users or _same(t, threshold)):
                bit_users.append(user)
                threshold = t
                if consumer.act_scale is not None:
                    if mean_ok and _k_from_mean_ok(consumer):
                        abs_mean = True
                    else:
                        readers_real = True
                readers_real |= consumer.affine is not None
                continue
        readers_real = True
    fold = None
    if bit_users and not readers_real and not abs_mean and residual is None and layer.act_scale is None:
        fold = fold_thresholds(layer, bn, act, threshold)
    module = PackedChain(layer, bn, residual is not None, act, fmt if readers_real else None, bits=bool(bit_users),
                         threshold=threshold, fold=fold, abs_mean=abs_mean)
    if len(nodes) == 1 and not bit_users:
        return alone
    if not _check(module, steps, formats, node, residual):
        log.warning("packed engine: the fused epilogue of %s differs from its torch modules; left unfused",
                    node.target)
        return alone
    return _Chain(module, nodes, residual, bit_users)


def _k_from_mean_ok(layer: PackedBinaryConv2d) -> bool:
    """Whether the layer's K(x) equals k_from_mean(mean_c |x|) here (checked once per layer)."""
    if not hasattr(layer, "_k_from_mean_checked"):
        c = layer.in_channels
        x = _probe((2, c, 7, 6) if layer.out_shape != (-1,) else (3, c), "nhwc") * 2
        with torch.no_grad():
            k = layer.act_scale(x)
            layer._k_from_mean_checked = torch.equal(layer.k_from_mean(x.abs().mean(dim=1, keepdim=True)), k)
    return layer._k_from_mean_checked


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _check(module: PackedChain, steps: list, formats, node: fx.Node, residual: fx.Node | None) -> bool:
    """The fused chain against its torch modules on a random batch of the recorded shapes."""
    x = _probe(formats[node.args[0].name][1], _format(formats, node.args[0])) * 2
    res = None if residual is None else _probe(formats[residual.name][1], _format(formats, residual)) * 3
    with torch.no_grad():
        ref = module.unfused(x, res, steps)
        out = module(x, res)
    if not isinstance(out, PackedActivation):
        return torch.equal(out, ref.real)
    return (torch.equal(out.bits, ref.bits) and (out.real is None or torch.equal(out.real, ref.real))
            and (out.abs_mean is None or torch.equal(out.abs_mean, ref.abs_mean)))


class PackedNetwork(nn.Module):
    """A packed model run as whole-network plans: one traced graph of PackedChains per input
    memory format (NCHW or channels_last), built on first use; `model` (the layer-by-layer packed
    network) where no plan could be built."""

    def __init__(self, model: nn.Module, formats: dict):
        super().__init__()
        self.model = model
        self._formats = formats
        self._plans: dict[str, Callable | None] = {}

    def plan(self, fmt: str) -> Callable:
        if fmt not in self._plans:
            try:
                self._plans[fmt] = compile_plan(self.model, self._formats[fmt])
            except Exception as e:  # an unforeseen graph: the layer-by-layer engine is exact too
                log.warning("packed engine: no whole-network plan for %s inputs (%s: %s); binary layers run "
                            "one by one", fmt, type(e).__name__, e)
                self._plans[fmt] = None
        return self._plans[fmt] or self.model

    def summary(self, fmt: str = "nchw") -> dict:
        """What the plan for `fmt` inputs does after each binary layer: how many layers fold BN -> sign
        into thresholds, run BN / a shortcut / an activation in the epilogue, hand bits to the next
        layer, and write a real output."""
        plan = self.plan(fmt)
        chains = [] if plan is self.model else [m for m in plan.modules() if isinstance(m, PackedChain)]
        unfolded = [c for c in chains if c.fold is None]
        return {"binary_layers": len(chains), "folded": len(chains) - len(unfolded),
                "bn_in_epilogue": sum(c.bn_mul is not None for c in unfolded),
                "shortcut_in_epilogue": sum(c.residual for c in unfolded),
                "act_in_epilogue": sum(c.act != "none" for c in unfolded),
                "k_mean_in_epilogue": sum(c.abs_mean for c in unfolded),
                "bits_to_next": sum(c.bits for c in chains), "real_written": sum(bool(c.real) for c in chains)}

    def forward(self, x: Tensor) -> Tensor:
        fmt = "nhwc" if x.dim() == 4 and memory_format(x) == torch.channels_last else "nchw"
        if fmt == "nchw" and not x.is_contiguous():
            x = x.contiguous()
        with torch.no_grad():
            return self.plan(fmt)(x)
