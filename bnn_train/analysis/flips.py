"""Flip ratio: the fraction of binary weights whose sign changed between two points of training.

With latent weights W and binary weights sign(W) (sign(0) = +1), a step changes the binary network
only where sign(W) flips; the flip ratio shows how much the binary network still moves, and drops
to ~0 when latent weights saturate at the clip bound or the learning rate is too small.
Helwegen et al. 2019, "Latent Weights Do Not Exist: Rethinking Binarized Neural Network
Optimization" (flips as the BNN's real updates); Liu et al. 2021, "How Do Adam and Training
Strategies Help BNNs Optimization?" (flip ratio per layer as a training diagnostic).
"""

from __future__ import annotations

import torch
from torch import nn

from bnn_train.binarize import binary_layers


class FlipTracker:
    """Per binarized layer: flips / n since the previous `update()` (or construction).

        flip/<layer> = #{i : sign(W_i) != sign(W_i^prev)} / n_layer
        flip/all     = sum of flips / sum of n over all binarized layers

    Keeps one bool (W >= 0) per binary weight on the weights' device; no float copies. Not part of
    checkpoints: after a resume the reference signs are taken afresh.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._signs: dict[str, torch.Tensor] = {name: self._sign(layer) for name, layer in binary_layers(model)}

    @staticmethod
    def _sign(layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach() >= 0  # sign(0) = +1, as the quantizers do

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """{"flip/<layer>": ratio, ..., "flip/all": ratio}; {} when no layer is binarized."""
        names, counts, sizes, signs = [], [], [], {}
        for name, layer in binary_layers(self.model):
            new = self._sign(layer)
            signs[name] = new
            old = self._signs.get(name)
            if old is None or old.shape != new.shape:
                continue  # a layer binarized since the last call: this call only takes its reference
            if old.device != new.device:  # the model moved (e.g. .to(device) after construction)
                old = old.to(new.device)
            names.append(name)
            counts.append(torch.count_nonzero(old != new))
            sizes.append(new.numel())
        self._signs = signs
        if not names:
            return {}
        # One device->host transfer for all layers, instead of a sync per layer.
        flips = torch.stack(counts).tolist()
        out = {f"flip/{n}": f / s for n, f, s in zip(names, flips, sizes)}
        out["flip/all"] = sum(flips) / sum(sizes)
        return out
