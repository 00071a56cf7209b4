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
    """Normalised sampling grid (B x k*k x rows x w x 2) for a band of LR rows."""
    taps, w = offsets_h.shape[1], offsets_h.shape[3]
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
    return torch.stack((gx, gy), dim=-1)  # B x taps x rows x w x 2


def row_bands(hr: torch.Tensor, taps: int, h: int, w: int, chunk_bytes: int) -> list[slice]:
    """Bands of LR rows whose sampled taps (B x C x taps x rows x w) fit in ``chunk_bytes``.

    At least one row per band, so memory stays bounded whatever the image size.
    """
    b, c = hr.shape[:2]
    bytes_per_row = b * max(c, 2) * taps * w * hr.element_size()  # the grid has 2 channels
    band = max(1, min(h, chunk_bytes // max(bytes_per_row, 1)))
    return [slice(start, min(h, start + band)) for start in range(0, h, band)]


def sample_taps(hr_p: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of the padded image at a band's grid: B x C x taps x rows x w.

    ``grid`` is B x taps x rows x w x 2 in grid_sample's normalised coordinates.
    """
    b, taps, n, w = grid.shape[:4]
    return F.grid_sample(
        hr_p,
        grid.reshape(b, taps * n, w, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    ).view(b, hr_p.shape[1], taps, n, w)


def resample_reference(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor,
    offsets_v: torch.Tensor,
    scale: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Adaptive resampling per section 2 of the method, in plain PyTorch ops."""
    hh, ww = hr.shape[-2:]
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

    out = []
    for rows in row_bands(hr, taps, h, w, chunk_bytes):
        grid = _band_grid(offsets_h, offsets_v, rows, k, scale, ratio_y, ratio_x, size_p)
        taps_img = sample_taps(hr_p, grid)
        weights = kernels[:, :, rows].unsqueeze(1)  # B x 1 x taps x n x w
        out.append((taps_img * weights).sum(dim=2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)
