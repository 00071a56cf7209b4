"""EDSR (Lim et al. 2017), the SR network that restores HR from the 8-bit LR image."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from carcli.models.config import CARConfig
from carcli.models.layers import MeanShift, needs_grad, weights_version
from carcli.models.precision import autocast
from carcli.models.sr import ALL_EDGES, Edges, SRNetwork, float_head_then_body, register_sr


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


class FusedTail(nn.Module):
    """EDSR's upsampler and last conv run as one conv at LR resolution, for inference.

    Every layer there (a conv and a pixel shuffle per factor 2, then the conv to RGB) is
    linear, so together they are one linear map from the body's features to RGB, which
    reaches ``REACH`` LR pixels: a 5 x 5 conv to ``3 * s**2`` channels at LR, then a pixel
    shuffle. At 4x that is 4.8k multiply-adds per HR pixel instead of 48k, and the
    64-channel tensors at 2x and 4x the LR size are never made. The layers pad every
    resolution with zeros, the fused conv only the LR one, so the two differ in the
    ``BAND`` LR pixels along the input's edges. Along the image's own edges that band is
    recomputed by the layers on strips ``STRIP`` pixels deep, so the output equals the
    layers' (to float32 rounding); along a tile's cut edges the caller crops it anyway.
    Holds no parameters: the fused weights are derived from the tail's, again whenever
    those change, move or are cast.
    """

    REACH = 2  # LR pixels the tail reads around an output pixel (EDSR.stage_margins)
    BAND = 1  # LR pixels along an edge where the layers' zero padding makes a difference
    STRIP = 3  # input depth from which the layers give that band exactly (tests prove both)

    def __init__(self, tail: nn.Sequential, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self._layers = [tail]  # a plain list: not a submodule, so no second set of weights
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def layers(self) -> nn.Sequential:
        return self._layers[0]

    @torch.no_grad()
    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight 3s^2 x F x 5 x 5, bias 3s^2) of the equivalent LR conv, from impulse responses.

        Run through a copy of the layers on an LR grid wide enough that no response meets
        its edges: feature channel c set to 1 at the centre gives, at LR offset (dy, dx)
        from it, the tap ``(REACH - dy, REACH - dx)`` of input c for every output channel.
        The copy runs on the CPU in the plain layout, in float32 (float64 for a float64
        network), so equal parameters give equal weights whatever the model's device, type
        or memory format (derived in each model's own layout, a channels-last copy of a
        model got weights 4e-8 apart, and outputs 1.6e-6 apart). Returns CPU tensors in
        that type; callers cast them.
        """
        s, r = self.scale, self.REACH
        dtype = torch.promote_types(next(self.layers.parameters()).dtype, torch.float32)
        layers = copy.deepcopy(self.layers).to("cpu", dtype)
        layers.to(memory_format=torch.contiguous_format)
        features = next(layers.parameters()).shape[1]
        like = {"dtype": dtype}
        side = 4 * r + 1
        c = side // 2
        impulses = torch.zeros(features, features, side, side, **like)
        impulses[torch.arange(features), torch.arange(features), c, c] = 1.0
        base = _unwatched(layers, torch.zeros(1, features, side, side, **like))
        response = F.pixel_unshuffle(_unwatched(layers, impulses) - base, s)  # F x 3s^2 x ...
        window = response[:, :, c - r : c + r + 1, c - r : c + r + 1]
        weight = window.flip(-1, -2).transpose(0, 1).contiguous()
        return weight, F.pixel_unshuffle(base, s)[0, :, c, c].contiguous()

    def _weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype, *weights_version(self.layers.parameters()))
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False):  # normal tensors: refinement backpropagates
                weight, bias = self.fused()
            self._cache = (key, weight.to(like), bias.to(like))
        return self._cache[1], self._cache[2]

    def forward(self, feats: torch.Tensor, edges: Edges = ALL_EDGES) -> torch.Tensor:
        """Body features (any float type) -> float32 RGB: ``layers(feats.float())``.

        ``edges`` (top, bottom, left, right): which sides of ``feats`` are the image's own
        edges; along the others the band may differ from the layers' (a tile's cut edges).
        A float64 network (tests, gradient checks) runs in float64.
        """
        weights_type = next(self.layers.parameters()).dtype
        x = feats.to(torch.promote_types(weights_type, torch.float32))
        if torch.compiler.is_exporting():
            return self._joined(x)
        if min(x.shape[-2:]) < 2 * self.STRIP:
            return self.layers(x)
        out = self._fused(x, *self._weights(x))
        for side, edge in zip(_SIDES, edges, strict=True):
            if edge:
                where, band = self._edge_band(x, side)
                out[where] = band
        return out

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(F.conv2d(x, weight, bias, padding=self.REACH), self.scale)

    def _edge_band(self, x: torch.Tensor, side: str) -> tuple[tuple, torch.Tensor]:
        """(where in the output, the layers' values there) for the band along one side,
        computed on a strip ``STRIP`` pixels deep (the whole input when it is smaller)."""
        n, b = self.STRIP, self.scale * self.BAND
        near = side in ("top", "left")
        strip, band = (
            (slice(None, n), slice(None, b)) if near else (slice(-n, None), slice(-b, None))
        )
        whole = slice(None)
        rows = side in ("top", "bottom")
        where = (..., band, whole) if rows else (..., whole, band)
        return where, self.layers(x[(..., strip, whole) if rows else (..., whole, strip)])[where]

    def _joined(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for a graph export (ONNX): the image's four edge bands joined to
        the fused conv's output with ``cat``, as the exporter cannot write into a slice,
        and no branch on the input size (a graph holds for every size). Exact from 2 LR
        pixels a side: below 2 * STRIP the strips are the whole input, which the layers
        compute exactly. ONNX Runtime, 4x, 2 MP: 1.4 s against 3.2 s with the layers."""
        # Under export the parameters are traced stand-ins (their versions and addresses
        # say nothing, and deriving the weights there would trace the impulse responses):
        # the weights of the last inference pass (export_onnx runs one first), else the
        # layers themselves.
        if self._cache is None:
            return self.layers(x)
        out = self._fused(x, self._cache[1], self._cache[2])
        band = self.scale * self.BAND
        top, bottom, left, right = (self._edge_band(x, side)[1] for side in _SIDES)
        out = torch.cat([top, out[..., band:-band, :], bottom], dim=-2)
        return torch.cat([left, out[..., :, band:-band], right], dim=-1)


# The order forward writes the edge bands in (the side bands overwrite the corners).
_SIDES = ("top", "bottom", "left", "right")


def _unwatched(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` for a purely sequential stack, leaf by leaf without forward hooks: the
    derivation's 64-image probe is not inference (the tiler's memory probe watches hooks)."""
    for layer in layers.modules():
        if not list(layer.children()):
            x = layer.forward(x)
    return x


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
        self.fused_tail = FusedTail(self.tail, config.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], any size -> RGB (unclamped) at ``scale`` times the size."""
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.fused_tail(x) if self._fused_ok() else self.tail(x))

    def _fused_ok(self) -> bool:
        """Inference (also a graph export) that needs no gradient for the tail's weights."""
        return not self.training and not needs_grad(self.tail.parameters())

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

    def reconstruct(
        self, feats: torch.Tensor, precision: str = "fp32", edges: Edges = ALL_EDGES
    ) -> torch.Tensor:
        """From the body's features to the (unclamped) HR image (as :meth:`forward`).

        For inference (eval mode, no gradient for the tail's weights) the tail runs as
        :class:`FusedTail`, in float32. In training the upsampler runs under autocast and
        the last conv (to RGB) in float32: in bfloat16 its output would carry only 8
        significant bits, as coarse as the 8-bit image itself (measured: it is where bf16
        lost PSNR).
        """
        if self._fused_ok():
            return self.add_mean(self.fused_tail(feats, edges))
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
