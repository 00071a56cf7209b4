"""EDSR (Lim et al. 2017), the SR network that restores HR from the 8-bit LR image."""

from __future__ import annotations

import math

import torch
from torch import nn

from carcli.models.config import CARConfig
from carcli.models.layers import MeanShift


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    def __init__(self, features: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3(features, features), nn.ReLU(), conv3(features, features))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1.0:
            res = res * self.res_scale
        return x + res


class Upsampler(nn.Sequential):
    """(conv3 F->4F, pixel-shuffle 2) once per factor of 2."""

    def __init__(self, features: int, scale: int) -> None:
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            layers += [conv3(features, 4 * features), nn.PixelShuffle(2)]
        super().__init__(*layers)


class EDSR(nn.Module):
    def __init__(self, config: CARConfig) -> None:
        super().__init__()
        f, n = config.sr.features, config.sr.blocks
        self.scale = config.scale
        self.sub_mean = MeanShift(-1.0)
        self.add_mean = MeanShift(1.0)
        self.head = nn.Sequential(conv3(3, f))
        self.body = nn.Sequential(
            *[ResBlock(f, config.sr.res_scale) for _ in range(n)], conv3(f, f)
        )
        self.tail = nn.Sequential(Upsampler(f, config.scale), conv3(f, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], any size -> RGB (unclamped) at ``scale`` times the size."""
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.tail(x))
