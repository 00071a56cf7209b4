"""Y-channel PSNR and SSIM, the convention of the super-resolution literature.

The numbers in papers (and in the method notes, section 5) are measured on the
BT.601 luma of 8-bit RGB, with ``scale`` pixels shaved from every border, PSNR
against a peak of 255 and SSIM per Wang et al. 2004 (11x11 Gaussian window,
sigma 1.5, averaged over the valid region, no padding). Anything else moves
the numbers by tenths of a dB, so this module fixes the convention in one
place. Everything is vectorised torch, so metrics run on whatever device the
images already live on: float64 on the CPU, float32 elsewhere.

Inputs are RGB in [0, 1]; callers that want the published numbers quantise to
8 bits first (``round(255 * x) / 255``), as the LR/SR images would be stored.
Y itself is not rounded. One-channel (greyscale) inputs count as R = G = B.
Identical images have PSNR ``float('inf')``; callers averaging over a data set
must handle it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["measure", "psnr_y", "psnr_y_batch", "rgb_to_y", "ssim_y", "ssim_y_batch"]

# BT.601 "studio swing" luma (MATLAB's rgb2ycbcr): Y = 16 + 65.481 R + 128.553 G
# + 24.966 B for R, G, B in [0, 1], the same as 16 + (65.481 R' + ...) / 255 for
# 8-bit R', G', B' in [0, 255]. (The /255 belongs to the 8-bit form only; with
# inputs in [0, 1] it would squeeze Y into [16, 16.86].)
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``...x1xHxW`` in [16, 235] from RGB ``...x3xHxW`` in [0, 1], unrounded.

    A 1-channel input is taken as grey (R = G = B), i.e. Y = 16 + 219 * x.
    """
    if rgb.dim() < 3:
        raise ValueError(f"expected ...xCxHxW, got shape {tuple(rgb.shape)}")
    channels = rgb.shape[-3]
    if channels == 1:
        return _Y_OFFSET + sum(_Y_WEIGHTS) * rgb
    if channels != 3:
        raise ValueError(f"expected 1 or 3 channels, got {channels}")
    r, g, b = rgb.unbind(dim=-3)
    y = _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b
    return y.unsqueeze(-3)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap and exact enough to compare with reference
    # implementations; float32 on accelerators (some lack float64 entirely).
    return torch.float64 if device.type == "cpu" else torch.float32


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be Bx3xHxW or Bx1xHxW, got shape {tuple(x.shape)}")
    return x


def _y_pair(
    pred: torch.Tensor, target: torch.Tensor, shave: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as shaved Bx1xHxW luma in the compute dtype."""
    pred, target = _as_batch(pred, "pred"), _as_batch(target, "target")
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    dtype = _compute_dtype(pred.device)
    y_pred = rgb_to_y(pred.to(dtype))
    y_target = rgb_to_y(target.to(device=pred.device, dtype=dtype))
    if shave:
        y_pred = y_pred[..., shave:-shave, shave:-shave]
        y_target = y_target[..., shave:-shave, shave:-shave]
    if y_pred.shape[-2] < 1 or y_pred.shape[-1] < 1:
        raise ValueError(f"shave={shave} leaves nothing of a {tuple(pred.shape[-2:])} image")
    return y_pred, y_target


def psnr_y_batch(pred: torch.Tensor, target: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image Y-PSNR in dB (peak 255) of Bx3xHxW batches; ``inf`` where images are equal."""
    y_pred, y_target = _y_pair(pred, target, shave)
    mse = (y_pred - y_target).square().mean(dim=(1, 2, 3))
    # 255^2 / 0 = inf and log10(inf) = inf: identical images give inf, no special case.
    return 10.0 * torch.log10(PEAK**2 / mse)


def _gaussian_1d(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    half = SSIM_WINDOW // 2
    x = torch.arange(-half, half + 1, device=device, dtype=dtype)
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian average over every full 11x11 window (no padding).

    On the CPU, OpenCV's separable filter is about 25x faster than a float64
    ``conv2d`` with the same sums (agreeing to about 1e-13), which makes SSIM
    cheap next to the networks in ``car roundtrip``.
    """
    if x.device.type == "cpu":
        kernel = g.numpy()
        half = SSIM_WINDOW // 2
        planes = [
            cv2.sepFilter2D(plane.numpy(), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
            for plane in x.detach().reshape(-1, *x.shape[-2:]).contiguous()
        ]
        valid = torch.from_numpy(np.stack(planes))[:, half:-half, half:-half]
        return valid.reshape(*x.shape[:-2], *valid.shape[-2:])
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim_y_batch(pred: torch.Tensor, target: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image Y-SSIM of Bx3xHxW batches, averaged over the windows that fit inside.

    The shaved image must be at least 11x11.
    """
    y_pred, y_target = _y_pair(pred, target, shave)
    if y_pred.shape[-2] < SSIM_WINDOW or y_pred.shape[-1] < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after shaving, "
            f"got {tuple(y_pred.shape[-2:])}"
        )
    g = _gaussian_1d(y_pred.device, y_pred.dtype)
    # (Co)variances are shift invariant: centre the data first so that
    # E[x^2] - E[x]^2 does not cancel catastrophically in float32.
    centre = 128.0
    a, b = y_pred - centre, y_target - centre
    mu_a, mu_b = _blur_valid(a, g), _blur_valid(b, g)
    var_a = _blur_valid(a * a, g) - mu_a * mu_a
    var_b = _blur_valid(b * b, g) - mu_b * mu_b
    cov = _blur_valid(a * b, g) - mu_a * mu_b
    mu_a, mu_b = mu_a + centre, mu_b + centre
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3))


def _single(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 4 and x.shape[0] != 1:
        raise ValueError(f"{name} must be one image (3xHxW or 1x3xHxW), got {tuple(x.shape)}")
    return x


def psnr_y(pred: torch.Tensor, target: torch.Tensor, shave: int = 0) -> float:
    """Y-PSNR in dB of one image (3xHxW or 1x3xHxW in [0, 1]); ``inf`` if identical."""
    return float(psnr_y_batch(_single(pred, "pred"), _single(target, "target"), shave)[0])


def ssim_y(pred: torch.Tensor, target: torch.Tensor, shave: int = 0) -> float:
    """Y-SSIM of one image (3xHxW or 1x3xHxW in [0, 1])."""
    return float(ssim_y_batch(_single(pred, "pred"), _single(target, "target"), shave)[0])


# Rows per band when measuring large images: the metrics work in float64 on the
# CPU, about ten maps of the image at once (2 GB for 24 MP); bands bound that.
MEASURE_BAND_ROWS = 512


def measure(pred: torch.Tensor, target: torch.Tensor, scale: int) -> tuple[float | None, float]:
    """(Y-PSNR, Y-SSIM) with ``scale`` pixels shaved; None where the image is too small.

    Tall images are measured in bands of rows (SSIM bands overlap by the window
    less one, so every window is counted once): the same numbers up to float
    summation order, in bounded memory.
    """
    if pred.shape[-2] - 2 * scale > 2 * MEASURE_BAND_ROWS:
        return _measure_in_bands(pred, target, scale)
    try:
        psnr = psnr_y(pred, target, shave=scale)
    except ValueError:
        psnr = None
    try:
        ssim = ssim_y(pred, target, shave=scale)
    except ValueError:
        ssim = None
    return psnr, ssim


def _measure_in_bands(pred: torch.Tensor, target: torch.Tensor, scale: int) -> tuple[float, float]:
    pred = pred[..., scale : pred.shape[-2] - scale, scale : pred.shape[-1] - scale]
    target = target[..., scale : target.shape[-2] - scale, scale : target.shape[-1] - scale]
    height, width = pred.shape[-2:]
    squared = 0.0  # sum of squared Y errors, from each band's PSNR
    for start in range(0, height, MEASURE_BAND_ROWS):
        rows = slice(start, min(height, start + MEASURE_BAND_ROWS))
        psnr = psnr_y(pred[..., rows, :], target[..., rows, :])
        mse = 0.0 if math.isinf(psnr) else PEAK**2 * 10 ** (-psnr / 10)
        squared += mse * (rows.stop - rows.start) * width
    mse = squared / (height * width)
    psnr = math.inf if mse == 0 else 10 * math.log10(PEAK**2 / mse)
    win = SSIM_WINDOW
    total, windows = 0.0, 0
    for start in range(0, height - win + 1, MEASURE_BAND_ROWS):
        rows = slice(start, min(height, start + MEASURE_BAND_ROWS + win - 1))
        count = (rows.stop - rows.start - win + 1) * (width - win + 1)
        total += ssim_y(pred[..., rows, :], target[..., rows, :]) * count
        windows += count
    return psnr, total / windows
