"""Binarization: quantizers, scaling factors, binary layers and the binarize_ transform.

The only package that knows about schemes; models never import it.
"""

from bnn_train.binarize.layers import BinaryConv2d, BinaryLinear
from bnn_train.binarize.quantizers import STES, ClippedSTE, IdentitySTE, SignSTE, build_ste, sign
from bnn_train.binarize.scaling import ScaledSignWeight, SignWeight, mean_abs_scale
from bnn_train.binarize.schemes import SCHEMES, Scheme, get_scheme
from bnn_train.binarize.transform import binarize_, binary_layers, clip_latent_, set_epoch_

__all__ = [
    "STES", "SCHEMES", "BinaryConv2d", "BinaryLinear", "ClippedSTE", "IdentitySTE", "Scheme",
    "ScaledSignWeight", "SignSTE", "SignWeight", "binarize_", "binary_layers", "build_ste",
    "clip_latent_", "get_scheme", "mean_abs_scale", "set_epoch_", "sign",
]
