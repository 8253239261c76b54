"""Binarization schemes: each is one dataclass, registered in `SCHEMES` by name.

A scheme's fields are its `method` config keys (the dataclass is their schema, registered in Hydra's
ConfigStore, and holds their defaults); its methods say what `binarize_` puts into each layer. A
new scheme is a `Scheme` subclass decorated with `@SCHEMES.register(name)` in any module of this
package, plus configs/method/NAME.yaml (see `irnet.py` for one in a file of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Optional

from torch import nn

from bnn_train.binarize.quantizers import (ActivationQuantizer, SignSTE, StochasticSign, ThresholdSign,
                                           ZeroOneSign, build_ste)
from bnn_train.binarize.scaling import (LearnableScaleSignWeight, MagnitudeSignWeight, ScaledSignWeight,
                                        SignWeight, StochasticSignWeight, WeightBinarizer, activation_scale_for)
from bnn_train.errors import ConfigError, FieldError, one_of, require
from bnn_train.registry import Registry


@dataclass
class Scheme:
    """A binarization method. keep_first_real / keep_last_real: the first and last Conv2d/Linear of
    the network (in module registration order) stay real; keep_downsample_real: layers under a module
    named `downsample` stay real; clip_latent: latent weights clamped to [-c, c] after every step."""

    name: str = "???"
    keep_first_real: bool = False
    keep_last_real: bool = False
    keep_downsample_real: bool = False
    clip_latent: Optional[float] = 1.0

    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    binary_activations: ClassVar[bool] = False  # sign() on the input of every binarized layer but the first
    default_ste: ClassVar[str] = "clipped"  # the activation estimator when none is chosen (YAML: override /ste)
    weight_ste: ClassVar[str] = "clipped"  # the weight estimator
    act: ClassVar[Optional[str]] = None  # the model's activation under model.act=auto (None: the model's own)
    needs_per_conv_shortcut: ClassVar[bool] = False

    def __post_init__(self):
        require(self.clip_latent is None or self.clip_latent > 0, "clip_latent", self.clip_latent,
                "must be > 0 (or null: no clip)")

    def weight_binarizer(self, weight: nn.Parameter, ste_node: dict) -> Optional[WeightBinarizer]:
        """The latent -> binary weight map of one layer (None: real weights); `ste_node`: the `ste`
        config (name and options), for `_weight_estimator`."""
        return None

    def input_quantizer(self, channels: int, ste: SignSTE) -> Optional[ActivationQuantizer]:
        """What a binarized layer (not the first) applies to its input; `ste`: the chosen estimator."""
        return ste if self.binary_activations else None

    def activation_scale(self, layer: nn.Module) -> Optional[nn.Module]:
        """A factor multiplying the binary product (XNOR-Net's K), or None."""
        return None

    def output_affine(self, channels: int) -> Optional[nn.Module]:
        """A learnable a * O + c after the product (ABC-Net), or None."""
        return None

    def _weight_estimator(self, ste_node: dict) -> SignSTE:
        """The weight estimator; with the `ste` group's options when it is the same estimator (IR-Net's
        EDE schedules weights and activations alike)."""
        same = ste_node.get("name") == self.weight_ste
        return build_ste(self.weight_ste, **({k: v for k, v in ste_node.items() if k != "name"} if same else {}))


SCHEMES: Registry[type[Scheme]] = Registry("method", "scheme")


def get_scheme(name: str, **keys) -> Scheme:
    """The scheme registered under `name` with its defaults, changed by `keys` (its `method` keys)."""
    cls = SCHEMES.lookup(name)
    valid = [f.name for f in fields(cls)]
    for key in keys:
        if key not in valid:
            raise ConfigError(f"method.{key}: {name} has no such key; valid keys: {', '.join(valid)}")
    try:
        return cls(**{"name": name, **keys})
    except FieldError as err:
        raise err.at("method") from None


@SCHEMES.register("fp")
@dataclass
class FullPrecision(Scheme):
    name: str = "fp"
    keep_first_real: bool = True
    keep_last_real: bool = True
    clip_latent: Optional[float] = None

    summary = "no binarization (full-precision baseline)"
    paper = "-"


WEIGHT_SCALES = ("none", "mean_abs", "learnable")


@dataclass
class BinaryScheme(Scheme):
    """The switches that the literature combines with any scheme that binarizes:

    weight_scale: alpha in W_b = alpha * sign(W): none | mean_abs (Rastegari et al. 2016, eq. 4) |
    learnable (XNOR-Net++, Bulat & Tzimiropoulos 2019), per output channel or per layer;
    affine_output: O = a * O_b + c per output channel (ABC-Net, Lin et al. 2017);
    act_levels: binary activations as {-1, +1} (pm1) or {0, 1} (01); act_stochastic: +1 with
    probability hard_sigmoid(x) while training (BinaryNet eq. 2); reg: loss + reg_weight * sum over
    layers of mean|W - Q(W)| (l1) or its square (l2).
    """

    weight_scale: str = "none"
    weight_scale_granularity: str = "channel"
    affine_output: bool = False
    act_levels: str = "pm1"
    act_stochastic: bool = False
    reg: str = "none"
    reg_weight: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "weight_scale", *WEIGHT_SCALES)
        one_of(self, "weight_scale_granularity", "channel", "layer")
        one_of(self, "act_levels", "pm1", "01")
        one_of(self, "reg", "none", "l1", "l2")
        require(self.reg_weight >= 0, "reg_weight", self.reg_weight, "must be >= 0")
        for key in ("act_levels", "act_stochastic"):
            require(getattr(self, key) in ("pm1", False) or self.binary_activations, key, getattr(self, key),
                    f"{self.name} keeps activations real; {key} applies to binary activations")

    def weight_binarizer(self, weight, ste_node):
        ste, per_channel = self._weight_estimator(ste_node), self.weight_scale_granularity == "channel"
        if self.weight_scale == "mean_abs":
            return ScaledSignWeight(ste, per_channel)
        if self.weight_scale == "learnable":
            return LearnableScaleSignWeight(ste, weight, per_channel)
        return SignWeight(ste)

    def input_quantizer(self, channels, ste):
        q = super().input_quantizer(channels, ste)
        if q is not None and self.act_stochastic:
            q = StochasticSign(q)
        if q is not None and self.act_levels == "01":
            q = ZeroOneSign(q)
        return q

    def output_affine(self, channels):
        from bnn_train.binarize.layers import AffineOutput  # layers imports the product, which needs no scheme

        return AffineOutput(channels) if self.affine_output else None


@SCHEMES.register("binaryconnect")
@dataclass
class BinaryConnect(BinaryScheme):
    """stochastic: W_b = +1 with probability clip((W + 1) / 2, 0, 1) while training (eq. 2)."""

    name: str = "binaryconnect"
    stochastic: bool = False

    summary = "weights sign(W), activations real"
    paper = "Courbariaux, Bengio & David 2015, BinaryConnect"
    weight_ste = "identity"

    def __post_init__(self):
        super().__post_init__()
        require(not self.stochastic or self.weight_scale == "none", "weight_scale", self.weight_scale,
                "stochastic BinaryConnect samples unscaled +-1 weights; use none or method.stochastic=false")

    def weight_binarizer(self, weight, ste_node):
        if self.stochastic:
            return StochasticSignWeight(self._weight_estimator(ste_node))
        return super().weight_binarizer(weight, ste_node)


@SCHEMES.register("bwn")
@dataclass
class BWN(BinaryScheme):
    name: str = "bwn"
    keep_first_real: bool = True
    keep_last_real: bool = True
    weight_scale: str = "mean_abs"

    summary = "weights alpha*sign(W), alpha = mean|W| per output channel; activations real"
    paper = "Rastegari et al. 2016, XNOR-Net (BWN)"


@SCHEMES.register("bnn")
@dataclass
class BNN(BinaryScheme):
    name: str = "bnn"

    summary = "weights sign(W), activations sign(x), no scaling"
    paper = "Hubara, Courbariaux et al. 2016, Binarized Neural Networks"
    binary_activations = True
    weight_ste = "identity"


@SCHEMES.register("xnor")
@dataclass
class XNOR(BinaryScheme):
    """act_scale=k_map: XNOR-Net's activation scale K (sec. 3.2), per output position."""

    name: str = "xnor"
    keep_first_real: bool = True
    keep_last_real: bool = True
    weight_scale: str = "mean_abs"
    act_scale: str = "k_map"

    summary = "weights alpha*sign(W) per output channel, activations sign(x)"
    paper = "Rastegari et al. 2016, XNOR-Net"
    binary_activations = True

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "act_scale", "none", "k_map")

    def activation_scale(self, layer):
        return activation_scale_for(layer) if self.act_scale == "k_map" else None


@SCHEMES.register("bireal")
@dataclass
class BiReal(BinaryScheme):
    """magnitude_aware: W_b = (||W||_1 / n) sign(W) with the magnitude-aware gradient (sec. 3.2);
    false: plain sign(W) (the paper's ablation)."""

    name: str = "bireal"
    keep_first_real: bool = True
    keep_last_real: bool = True
    keep_downsample_real: bool = True
    weight_scale: str = "mean_abs"
    magnitude_aware: bool = True

    summary = ("magnitude-aware weights (||W||_1/n)*sign(W) with the paper's scaled gradient; activations sign(x), "
               "ApproxSign estimator by default")
    paper = "Liu et al. 2018, Bi-Real Net"
    binary_activations = True
    default_ste = "approx_sign"

    def weight_binarizer(self, weight, ste_node):
        if self.weight_scale == "mean_abs":
            ste = self._weight_estimator(ste_node)
            if not self.magnitude_aware:
                return SignWeight(ste)
            return MagnitudeSignWeight(ste, self.weight_scale_granularity == "channel")
        return super().weight_binarizer(weight, ste_node)


@SCHEMES.register("reactnet")
@dataclass
class ReActNet(BiReal):
    name: str = "reactnet"

    summary = "Bi-Real weights; activations RSign sign(x - beta_c) and RPReLU after each block"
    paper = "Liu et al. 2020, ReActNet"
    act = "rprelu"
    needs_per_conv_shortcut = True

    def input_quantizer(self, channels, ste):
        q = ThresholdSign(channels, ste)
        if self.act_stochastic:
            q = StochasticSign(q)
        return ZeroOneSign(q) if self.act_levels == "01" else q
