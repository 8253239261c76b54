"""Binarization: quantizers, scaling factors, binary layers, schemes and the binarize_ transform.

The only package that knows about schemes; models never import it. Every module in it is imported
here, so a scheme or estimator registers itself by being a file in this folder.
"""

from bnn_train.binarize.layers import BinaryConv2d, BinaryLinear
from bnn_train.binarize.quantizers import (STES, ActivationQuantizer, ClippedSTE, EpochScheduled, IdentitySTE,
                                           IndicatorSTE, SignSTE, build_ste, sign)
from bnn_train.binarize.scaling import (ScaledSignWeight, SignWeight, SplitWeightBinarizer, WeightBinarizer,
                                        mean_abs_scale)
from bnn_train.binarize.schemes import SCHEMES, BinaryScheme, Scheme, get_scheme
from bnn_train.binarize.transform import binarize_, binary_layers, clip_latent_, set_epoch_
from bnn_train.registry import import_submodules

import_submodules(__name__)

__all__ = [
    "STES", "SCHEMES", "ActivationQuantizer", "BinaryConv2d", "BinaryLinear", "BinaryScheme", "ClippedSTE",
    "EpochScheduled", "IdentitySTE", "IndicatorSTE", "Scheme", "ScaledSignWeight", "SignSTE", "SignWeight",
    "SplitWeightBinarizer", "WeightBinarizer", "binarize_", "binary_layers", "build_ste", "clip_latent_",
    "get_scheme", "mean_abs_scale", "set_epoch_", "sign",
]
