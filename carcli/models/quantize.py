"""Rounding to the grid an image file holds: 8 bits for the LR image, N bits for outputs.

One module for every quantiser: inference (:func:`quantize`, :func:`quantize_bits`),
and training and refinement (:func:`quantize_for_training`, the same rounding with a
usable gradient).
"""

from __future__ import annotations

import math

import torch

from carcli.defaults import QUANT_GRADIENTS


def quantize(lr: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid (what a stored PNG holds)."""
    return torch.round(lr.clamp(0.0, 1.0) * 255.0) / 255.0


def quantize_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp to [0, 1] and round to the grid a file of ``bits`` per sample holds."""
    if bits == 8:
        return quantize(x)
    if bits > 16:  # float data (tensors from the Python API): no grid to round to
        return x.clamp(0.0, 1.0)
    peak = float(2**bits - 1)
    return torch.round(x.clamp(0.0, 1.0) * peak) / peak


def quantize_bits_(x: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`quantize_bits` in place, for tensors the caller owns (saves two copies)."""
    with torch.inference_mode():  # the processor's outputs are inference tensors
        if bits > 16:
            return x.clamp_(0.0, 1.0)
        peak = float(2**bits - 1)
        return x.clamp_(0.0, 1.0).mul_(peak).round_().div_(peak)


class _Quantize(torch.autograd.Function):
    """Round to the 8-bit grid forward; soft-round (or straight-through) gradient backward."""

    @staticmethod
    def forward(ctx, lr: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: ANN001
        z = lr.clamp(0.0, 1.0) * 255.0
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return torch.round(z) / 255.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (z,) = ctx.saved_tensors
        if ctx.alpha == 0.0:
            return grad, None
        return grad * (1.0 - ctx.alpha * torch.cos(2.0 * math.pi * z)), None


def quantize_for_training(
    lr: torch.Tensor, gradient: str = "ste", alpha: float = 0.5
) -> torch.Tensor:
    """Real 8-bit rounding of ``lr``; ``gradient`` is "ste" or "soft" (soft-round, weight alpha).

    The clamp to [0, 1] passes gradients straight through, so a resampler that
    overshoots is still pulled back by the reconstruction loss.
    """
    if gradient not in QUANT_GRADIENTS:
        names = " or ".join(repr(name) for name in QUANT_GRADIENTS)
        raise ValueError(f"quantisation gradient must be {names}, got {gradient!r}")
    return _Quantize.apply(lr, alpha if gradient == "soft" else 0.0)
