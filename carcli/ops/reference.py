"""Pure-PyTorch adaptive resampling: runs on any device and is differentiable.

Each tap of each LR pixel is one bilinear sample of the reflect-padded HR
image, so the whole op is a ``grid_sample`` (border padding, aligned corners)
over a grid of ``k*k`` points per LR pixel followed by a weighted sum over the
taps. The grid is built for a band of LR rows at a time so that the
``B x C x k*k x rows x w`` temporary stays within a fixed memory budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Bytes allowed for the sampled-taps temporary of one band of LR rows.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def kernel_size_of(taps: int) -> int:
    """Side k of a square kernel with ``taps`` = k*k entries (k odd)."""
    k = math.isqrt(taps)
    if k * k != taps or k % 2 == 0:
        raise ValueError(f"kernels must have k*k channels with k odd, got {taps}")
    return k


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad all four sides by ``pad``, even past the image size.

    Reflecting repeatedly, each side by at most its length - 1, gives the
    periodic mirror extension (period 2 * (n - 1)) that a single reflection
    would give if it could reach that far. A 1-pixel side has nothing to
    mirror and is replicated.
    """
    left = [pad, pad]  # still to add along (H, W)
    while left[0] > 0 or left[1] > 0:
        h, w = x.shape[-2:]
        step_h = min(left[0], h - 1) if h > 1 else 0
        step_w = min(left[1], w - 1) if w > 1 else 0
        if step_h == 0 and step_w == 0:
            return F.pad(x, (left[1], left[1], left[0], left[0]), mode="replicate")
        x = F.pad(x, (step_w, step_w, step_h, step_h), mode="reflect")
        left = [left[0] - step_h, left[1] - step_w]
    return x


def _band_grid(
    offsets_h: torch.Tensor,
    offsets_v: torch.Tensor,
    rows: slice,
    k: int,
    scale: int,
    ratio_y: float,
    ratio_x: float,
    size_p: tuple[int, int],
) -> torch.Tensor:
    """Normalised sampling grid (B x k*k*rows x w x 2) for a band of LR rows."""
    b, taps, _, w = offsets_h.shape
    dx = offsets_h[:, :, rows]
    dy = offsets_v[:, :, rows]
    n_rows = dx.shape[2]
    dev, dt = dx.device, dx.dtype
    tap = torch.arange(taps, device=dev)
    u = (tap // k).to(dt).view(1, taps, 1, 1)
    v = (tap % k).to(dt).view(1, taps, 1, 1)
    i = torch.arange(rows.start, rows.start + n_rows, device=dev, dtype=dt).view(1, 1, n_rows, 1)
    j = torch.arange(w, device=dev, dtype=dt).view(1, 1, 1, w)
    px = (j + 0.5) * ratio_x + v + scale * dx - 0.5
    py = (i + 0.5) * ratio_y + u + scale * dy - 0.5
    hp, wp = size_p
    gx = px * (2.0 / max(wp - 1, 1)) - 1.0
    gy = py * (2.0 / max(hp - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)  # B x taps x rows x w x 2
    return grid.reshape(b, taps * n_rows, w, 2)


def resample_reference(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor,
    offsets_v: torch.Tensor,
    scale: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Adaptive resampling per section 2 of the method, in plain PyTorch ops."""
    b, c, hh, ww = hr.shape
    taps, h, w = kernels.shape[1:]
    k = kernel_size_of(taps)
    pad = k // 2
    hr_p = reflect_pad(hr, pad)
    size_p = (hr_p.shape[-2], hr_p.shape[-1])
    ratio_y, ratio_x = hh / h, ww / w
    # grid_sample needs matching dtypes; sample in the image's dtype.
    offsets_h = offsets_h.to(hr.dtype)
    offsets_v = offsets_v.to(hr.dtype)
    kernels = kernels.to(hr.dtype)

    bytes_per_row = b * max(c, 2) * taps * w * hr.element_size()
    band = max(1, min(h, chunk_bytes // max(bytes_per_row, 1)))
    out = []
    for start in range(0, h, band):
        rows = slice(start, min(h, start + band))
        n = rows.stop - rows.start
        grid = _band_grid(offsets_h, offsets_v, rows, k, scale, ratio_y, ratio_x, size_p)
        taps_img = F.grid_sample(
            hr_p, grid, mode="bilinear", padding_mode="border", align_corners=True
        ).view(b, c, taps, n, w)
        weights = kernels[:, :, rows].unsqueeze(1)  # B x 1 x taps x n x w
        out.append((taps_img * weights).sum(dim=2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)
