"""The resampler (kernel generation) network: HR image -> per-LR-pixel kernels and offsets."""

from __future__ import annotations

import torch
from torch import nn

from carcli.models.config import CARConfig
from carcli.models.layers import (
    DownsampleBlock,
    MeanShift,
    ReflectSequential,
    ResidualBlock,
    UpsampleBlock,
    needs_grad,
    reflect_conv3,
)

# Input sides must be multiples of this (three pixel-unshuffles by 2).
SIZE_MULTIPLE = 8

Offset = torch.Tensor | None  # None: a resampler without offsets (taps at fixed places)


def _trunk(width: int, convs: int, factor: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(convs):
        layers += [*reflect_conv3(width, width), nn.ReLU()]
    layers.append(UpsampleBlock(width, factor))
    layers += [*reflect_conv3(width, width), nn.ReLU()]
    return ReflectSequential(*layers)


def _head(width: int, taps: int, tanh: bool, last_kernel: int = 3) -> nn.Sequential:
    last = reflect_conv3(width, taps) if last_kernel == 3 else [nn.Conv2d(width, taps, 1)]
    layers = [*reflect_conv3(width, width), nn.ReLU(), *last]
    if tanh:
        layers.append(nn.Tanh())
    return ReflectSequential(*layers)


class ClampTowardRange(torch.autograd.Function):
    """``clamp`` forward; backward also passes gradients that lead back into the range.

    A plain clamp gives zero gradient outside [lo, hi], so a kernel tap that
    once falls below 1e-6 (or rises above 1) can never come back: in training
    the kernels collapsed to a few saturated taps, a fixed point-sampling
    filter. Letting through the gradients that point back into the range
    keeps every tap trainable and changes nothing in the forward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        # Gradient descent moves x by -grad: below lo only grad < 0 helps, above hi grad > 0.
        blocked = ((x < ctx.lo) & (grad > 0)) | ((x > ctx.hi) & (grad < 0))
        return grad.masked_fill(blocked, 0.0), None, None


def normalize_kernels(raw: torch.Tensor) -> torch.Tensor:
    """Clamp to [1e-6, 1] and divide by the sum over taps: convex weights."""
    k = ClampTowardRange.apply(raw, 1e-6, 1.0)
    return k / k.sum(dim=1, keepdim=True).clamp_min(1e-6)


def _normalize_in_place(raw: torch.Tensor) -> torch.Tensor:
    """:func:`normalize_kernels` without autograd, reusing ``raw``'s (float32) memory."""
    k = raw.clamp_(1e-6, 1.0)
    return k.div_(k.sum(dim=1, keepdim=True).clamp_min_(1e-6))


def _inference(t: torch.Tensor) -> bool:
    return not needs_grad([t])


def _normalized(raw: torch.Tensor) -> torch.Tensor:
    """Convex kernels from float32 raw ones: in place without autograd."""
    return _normalize_in_place(raw) if _inference(raw) else normalize_kernels(raw)


def _tap_planes(raw: torch.Tensor) -> torch.Tensor:
    """Float32 with one contiguous plane per tap, in the same pass as the cast.

    The fixed-tap op weights a whole image phase by one tap's plane at a time; from a
    channels-last tensor each plane is a gather with a stride of k*k, and converting
    afterwards costs what it saves (4x, 2 MP, bf16: downscale 270 -> 220 ms this way).
    """
    return raw.to(torch.float32, memory_format=torch.contiguous_format)


def cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5, as MATLAB's imresize)."""
    x = x.abs()
    x2, x3 = x * x, x * x * x
    near = (a + 2) * x3 - (a + 3) * x2 + 1
    far = a * x3 - 5 * a * x2 + 8 * a * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


class ResamplerNet(nn.Module):
    def __init__(self, config: CARConfig) -> None:
        super().__init__()
        r, s = config.resampler, config.scale
        taps = config.kernel_size**2
        self.scale = s
        self.blocks, self.trunk_convs = r.blocks, r.trunk_convs
        self.head_reach = 1 + r.head_kernel // 2  # pixels at H/s: the heads' two convs
        self.sub_mean = MeanShift(-1.0)
        self.ds_1 = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, r.c1, 5), nn.LeakyReLU(0.2))
        self.ds_2 = DownsampleBlock(r.c1, r.c2)
        self.ds_4 = DownsampleBlock(r.c2, r.c4)
        self.res_4 = nn.Sequential(*[ResidualBlock(r.c4) for _ in range(r.blocks)])
        self.ds_8 = DownsampleBlock(r.c4, r.c8)
        self.taps = taps
        self.shared = r.head == "shared"
        self.offsets = r.offsets
        if self.shared:  # one trunk and head; the last conv makes kernels and both offsets
            self.trunk = _trunk(r.c8, r.trunk_convs, SIZE_MULTIPLE // s)
            outputs = 3 * taps if self.offsets else taps
            self.head = _head(r.c8, outputs, tanh=False, last_kernel=r.head_kernel)
            return
        self.kernels_trunk = _trunk(r.c8, r.trunk_convs, SIZE_MULTIPLE // s)
        self.kernels_weight = _head(r.c8, taps, tanh=False, last_kernel=r.head_kernel)
        if not self.offsets:
            return
        self.offsets_trunk = _trunk(r.c8, r.trunk_convs, SIZE_MULTIPLE // s)
        self.offsets_h_generation = _head(r.c8, taps, tanh=True, last_kernel=r.head_kernel)
        self.offsets_v_generation = _head(r.c8, taps, tanh=True, last_kernel=r.head_kernel)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Offset, Offset]:
        """RGB in [0, 1], sides multiples of 8 -> (kernels, offsets_h, offsets_v) at H/s.

        Without offsets (``offsets: false``) both offsets are None: taps at fixed places.
        """
        x = self.sub_mean(x)
        x = self.ds_1(x)
        x = self.ds_2(x)
        x = self.ds_4(x)
        x = x + self.res_4(x)
        x = self.ds_8(x)
        if self.shared and not self.offsets:
            return _normalized(_tap_planes(self.head(self.trunk(x)))), None, None
        if self.shared:
            raw, offsets_h, offsets_v = self.head(self.trunk(x)).split(self.taps, dim=1)
            if _inference(raw):
                # In place, in float32 (what the op takes; bfloat16 tanh is the slower):
                # 170 against 250 ms at 4x for a 2 MP image, offsets within 2e-3.
                offsets_h, offsets_v = offsets_h.float().tanh_(), offsets_v.float().tanh_()
                return _normalize_in_place(raw.float()), offsets_h, offsets_v
            return normalize_kernels(raw.float()), torch.tanh(offsets_h), torch.tanh(offsets_v)
        k = self.kernels_trunk(x)
        # The raw kernels reach the normalisation in float32, also under autocast: it
        # divides by a sum over k*k taps, which in bfloat16 keeps 8 significant bits and
        # rounds differently with the reduction's split over threads, i.e. with the tile
        # size (measured on a 4x model: 14 % of LR pixels moved by a level against fp32
        # and 0.2 % between tile sizes; in float32, 0.4 % and 0.02 %).
        if not self.offsets:
            return _normalized(_tap_planes(self.kernels_weight(k))), None, None
        kernels = _normalized(self.kernels_weight(k).float())
        o = self.offsets_trunk(x)
        return kernels, self.offsets_h_generation(o), self.offsets_v_generation(o)

    def reach(self) -> int:
        """HR pixels beyond an LR pixel's own s x s block that its outputs depend on.

        Follows one LR pixel's dependencies back through the network (heads and
        trunk convs at H/s, the pixel shuffle, trunk convs at H/8, residual blocks
        at H/4, the unshuffles and the 5x5 conv at HR) for every LR phase within
        an 8-pixel cell.
        """
        s = self.scale
        cell = SIZE_MULTIPLE // s  # LR pixels per H/8 cell
        need = 0
        reach = self.head_reach + 1  # the heads' convs and one trunk conv at H/s
        for i in range(cell):
            lo, hi = i - reach, i + reach
            lo, hi = lo // cell - self.trunk_convs, hi // cell + self.trunk_convs  # H/8
            lo, hi = 2 * lo - 2 * self.blocks, 2 * hi + 1 + 2 * self.blocks  # H/4
            lo, hi = 4 * lo - 2, 4 * hi + 3 + 2  # HR, then the 5x5 conv
            need = max(need, i * s - lo, hi - (i * s + s - 1))
        return need

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Fresh kernel and offset heads, started as bicubic (to revive collapsed heads)."""
        if self.shared:
            heads: tuple[nn.Module, ...] = (self.head,)
        elif self.offsets:
            heads = (self.kernels_weight, self.offsets_h_generation, self.offsets_v_generation)
        else:
            heads = (self.kernels_weight,)
        for head in heads:
            for layer in head:
                if isinstance(layer, nn.Conv2d):
                    layer.reset_parameters()
        self.init_as_bicubic()

    @torch.no_grad()
    def init_as_bicubic(self) -> None:
        """Start as a fixed antialiasing cubic kernel with zero offsets (LR close to bicubic)."""
        k = int(round(self.taps**0.5))
        pos = (torch.arange(k, dtype=torch.float32) - k // 2) / self.scale
        w1 = cubic(pos).clamp_min(1e-6)
        w2 = torch.outer(w1, w1)
        w2 = w2 / w2.sum() * 0.5  # leave headroom under the clamp at 1
        zeros = torch.zeros(k * k)
        if self.shared:
            bias = torch.cat([w2.flatten(), zeros, zeros]) if self.offsets else w2.flatten()
            last_convs: tuple[tuple[nn.Conv2d, torch.Tensor], ...] = ((self.head[-1], bias),)
        else:
            last_convs = ((self.kernels_weight[-1], w2.flatten()),)
            if self.offsets:
                last_convs += (
                    (self.offsets_h_generation[-2], zeros),
                    (self.offsets_v_generation[-2], zeros),
                )
        for head, bias in last_convs:
            head.weight.mul_(1e-3)
            head.bias.copy_(bias)
