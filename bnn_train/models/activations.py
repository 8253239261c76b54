"""Activations that need to know their channel count (the registry passes it to every factory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu, Shen, Savvides & Cheng 2020, "ReActNet", eq. 4).

    f(x_c) = PReLU(x_c - gamma_c) + zeta_c, PReLU(y) = max(0, y) + beta_c * min(0, y),
    with learnable per-channel shift gamma (init 0), slope beta (init 0.25) and shift zeta
    (init 0). Channels are dim 1, so it applies to [B, C, H, W] and [B, C] alike.
    """

    def __init__(self, channels: int, slope: float = 0.25):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.full((channels,), slope))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast the per-channel shifts over dim 1
        return F.prelu(x - self.gamma.view(shape), self.beta) + self.zeta.view(shape)

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}"
