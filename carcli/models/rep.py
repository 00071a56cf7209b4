"""A re-parameterisable plain SR network: trained multi-branch, run as one 3x3 conv per layer.

The design follows the structural re-parameterisation idea of RepVGG (Ding et al., CVPR 2021)
as applied to super-resolution by ECBSR (Zhang et al., ACM MM 2021) and RepSR (Wang et al.,
ACM MM 2022): during training each layer is the sum of a 3x3 conv, a 1x1 conv and the identity,
which trains more easily than a single 3x3 conv; all three are linear, so for inference they
collapse exactly into one 3x3 conv. The network is then a plain stack of convolutions with
PReLU, a global skip and a sub-pixel (pixel-shuffle) tail: no residual-block overhead, an
upsampler of one conv instead of EDSR's conv-per-factor-2 at growing resolution, and an exact,
small receptive field for tiling.

Under mixed precision the head conv (it reads the 8-bit image) and the tail conv (it writes
RGB) run in float32, as EDSR's first and last convs do, for the same reasons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carcli.models.config import CARConfig
from carcli.models.layers import MeanShift, needs_grad, weights_version
from carcli.models.sr import ALL_EDGES, Edges, SRNetwork, float_head_then_body, register_sr


class RepConv3(nn.Module):
    """3x3 conv + 1x1 conv (+ identity when ``cin == cout``), fused into one 3x3 at inference.

    The stored parameters are always the branches, so a checkpoint resumes training as it was
    saved; in eval mode the fused kernel is computed once and cached until a parameter changes.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.conv3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 1)
        self.identity = cin == cout
        self._cache: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single 3x3 conv equal to the sum of the branches."""
        weight = self.conv3.weight + F.pad(self.conv1.weight, (1, 1, 1, 1))
        if self.identity:
            eye = torch.zeros_like(self.conv3.weight)
            idx = torch.arange(self.cout, device=eye.device)
            eye[idx, idx, 1, 1] = 1.0
            weight = weight + eye
        return weight, self.conv3.bias + self.conv1.bias

    def _fused_cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = (self.conv3.weight, self.conv3.bias, self.conv1.weight, self.conv1.bias)
        key = weights_version(params)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                weight, bias = self.fused()
            self._cache = (key, weight, bias)
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            out = self.conv3(x) + self.conv1(x)
            return out + x if self.identity else out
        if needs_grad(self.parameters()):
            weight, bias = self.fused()  # gradients must reach the branches
        else:
            weight, bias = self._fused_cached()
        return F.conv2d(x, weight, bias, padding=1)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        self._cache = None  # moved or cast: fuse again
        return super()._apply(fn, recurse)


class SubPixelTail(nn.Module):
    """One (re-parameterisable) conv to ``3 * scale**2`` channels, then a pixel shuffle."""

    def __init__(self, features: int, scale: int) -> None:
        super().__init__()
        self.conv = RepConv3(features, 3 * scale * scale)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class RepSR(SRNetwork):
    """head conv, ``blocks`` x (RepConv3, PReLU), global skip, sub-pixel tail (mean-shifted RGB)."""

    def __init__(self, features: int, blocks: int, scale: int) -> None:
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"RepSR supports scales 2, 3 and 4, got {scale}")
        self.scale = scale
        self.blocks = blocks
        self.features_width = features
        self.sub_mean = MeanShift(-1.0)
        self.add_mean = MeanShift(1.0)
        self.head = nn.Sequential(RepConv3(3, features))
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [RepConv3(features, features), nn.PReLU(features)]
        self.body = nn.Sequential(*layers)
        self.tail = SubPixelTail(features, scale)
        self._init_near_identity()

    def _init_near_identity(self) -> None:
        """Small branch weights: each body layer starts close to its identity branch.

        With PyTorch's default init the identity branches let activations double every
        few layers (output std about 6 at 16 layers); scaled down, the body starts as an
        identity map and the output as the mean colour.
        """
        with torch.no_grad():
            for m in [*self.body, self.tail.conv]:
                if isinstance(m, RepConv3):
                    for conv in (m.conv3, m.conv1):
                        conv.weight.mul_(0.1)
                        conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], any size -> RGB (unclamped) at ``scale`` times the size."""
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.tail(x))

    def stage_margins(self) -> tuple[int, int]:
        """(features, tail) LR pixels of context: one per 3x3 conv in each stage."""
        return self.blocks + 1, 1

    def margin(self) -> int:
        return sum(self.stage_margins())

    def features(self, lr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Head (float32: it reads the 8-bit image) and body with the global skip."""
        return float_head_then_body(self, lr, precision)

    def reconstruct(
        self, feats: torch.Tensor, precision: str = "fp32", edges: Edges = ALL_EDGES
    ) -> torch.Tensor:
        """The sub-pixel tail in float32: its output is the RGB image itself."""
        return self.add_mean(self.tail(feats.float()))

    def autograd_elements_per_pixel(self) -> float:
        """Per LR pixel: conv output, PReLU output and the branch sums of every layer."""
        return self.features_width * (3 * self.blocks + 2) + 6 * self.scale**2


def _build(config: CARConfig) -> RepSR:
    return RepSR(config.sr.features, config.sr.blocks, config.scale)


register_sr("rep", _build)
