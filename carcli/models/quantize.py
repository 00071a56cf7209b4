"""Rounding to the grid an image file holds (8 bits for the LR image)."""

from __future__ import annotations

import torch


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
