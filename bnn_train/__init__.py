"""bnn-train: train, ablate and compare binary neural networks with PyTorch and Hydra."""

__version__ = "0.1.0"
