"""EDSR (Lim et al. 2017), the SR network that restores HR from the 8-bit LR image."""

from __future__ import annotations

import math

import torch
from torch import nn

from carcli.models.config import CARConfig
from carcli.models.layers import MeanShift
from carcli.models.precision import autocast
from carcli.models.sr import SRNetwork, float_head_then_body, register_sr


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


class EDSR(SRNetwork):
    def __init__(self, config: CARConfig) -> None:
        super().__init__()
        f, n = config.sr.features, config.sr.blocks
        self.scale = config.scale
        self.width, self.blocks = f, n
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

    def stage_margins(self) -> tuple[int, int]:
        """(body, upsampler) LR pixels of context: the 3x3 convs before and after.

        The body margin counts the head conv, two convs per residual block and the
        body's last conv; the upsampler's convs at LR, 2x and HR reach 2 LR pixels.
        """
        return 2 * self.blocks + 2, 2

    def margin(self) -> int:
        return sum(self.stage_margins())

    def features(self, lr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Head and residual body with its skip (as :meth:`forward`), at ``precision``.

        The mean shift and the first conv run in float32, only the body under
        autocast. Their input is the 8-bit image, which bfloat16 (8 significant
        bits) would round by up to a quarter of a level (measured at 2x: Set5
        0.008 dB below this, which is within 0.001 dB of fp32).
        """
        return float_head_then_body(self, lr, precision)

    def reconstruct(self, feats: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """From the body's features to the (unclamped) HR image (as :meth:`forward`).

        The upsampler runs under autocast; the last conv (to RGB) always runs in
        float32: in bfloat16 its output would carry only 8 significant bits, as
        coarse as the 8-bit image itself (measured: it is where bf16 lost PSNR).
        """
        with autocast(feats.device, precision):
            x = self.tail[:-1](feats)
        return self.add_mean(self.tail[-1](x.float()))

    def autograd_elements_per_pixel(self) -> float:
        """About 4 maps per residual block plus the head's and body's, F channels each, and
        the upsampler's, which grow with s^2.

        (Peak resident memory measured for one refinement step on a 64 x 64 LR tile,
        fp32: 47.5 KB per LR pixel at 4x, 34.5 at 2x; this estimate, doubled for the
        backward pass: 83 and 47.)
        """
        return self.width * (4 * self.blocks + 3 + 6 * self.scale**2)


register_sr("edsr", EDSR)
