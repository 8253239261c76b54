"""Deploying trained BNNs: packed 1-bit export and the XNOR/popcount inference engine."""

from bnn_train.deploy.packed import export, load_packed

__all__ = ["export", "load_packed"]
