"""The CAR regularisers on the resampler's kernels and offsets."""

from __future__ import annotations

import math

import torch


def tap_distance_weights(k: int, device: torch.device | None = None) -> torch.Tensor:
    """Distance of each tap from the kernel centre divided by k, as k*k x 1 x 1."""
    r = torch.arange(k, device=device, dtype=torch.float32) - k // 2
    d = torch.sqrt(r.view(k, 1) ** 2 + r.view(1, k) ** 2) / k
    return d.reshape(k * k, 1, 1)


def offset_loss(offsets_h: torch.Tensor, offsets_v: torch.Tensor) -> torch.Tensor:
    """Distance-weighted offset magnitudes, summed over taps and pixels, per batch*h*w."""
    b, taps, h, w = offsets_h.shape
    k = math.isqrt(taps)
    weights = tap_distance_weights(k, offsets_h.device)
    mag = torch.sqrt(offsets_h.float() ** 2 + offsets_v.float() ** 2 + 1e-12)
    return (mag * weights).sum() / (b * h * w)


def tv_loss(
    kernels: torch.Tensor, offsets_h: torch.Tensor, offsets_v: torch.Tensor
) -> torch.Tensor:
    """Kernel-weighted partial total variation of the offsets, per LR pixel.

    Summed over taps and averaged over batch and pixels, like the offset term,
    so its weight does not depend on the patch size. (A published port divides
    by the batch size only; at 96 px patches and 4x that is 576x stronger, and
    in our runs it flattened the offsets to constants and killed their heads.)
    """
    kernels, offsets_h, offsets_v = kernels.float(), offsets_h.float(), offsets_v.float()
    dy_h = (offsets_v[..., :, 1:] - offsets_v[..., :, :-1]).abs() * kernels[..., :, :-1]
    dx_v = (offsets_h[..., 1:, :] - offsets_h[..., :-1, :]).abs() * kernels[..., :-1, :]
    b, _, h, w = kernels.shape
    return (dy_h.sum() + dx_v.sum()) / (b * h * w)
