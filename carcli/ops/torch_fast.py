"""The pure-PyTorch resampling op that `car` runs: the reference's arithmetic, cheaper.

:func:`carcli.ops.reference.resample_reference` is written to be read; this one
is what every CPU run (and a GPU without the native build) calls. Same formula,
same bilinear samples; two things make it about 3x faster on a CPU
(``python bench/resample_op.py --device cpu``):

* the sampling grid is one fused add per coordinate onto a precomputed base
  (the reference spends a dozen full-size elementwise passes on it);
* without autograd, the sampled taps are weighted in place and summed straight
  into the output band, so no band-sized temporaries are allocated per band.

With autograd it stays a composition of differentiable ops (the grid is
stacked, the product is out of place), so training uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carcli.ops.reference import kernel_size_of, reflect_pad, row_bands, sample_taps

# Bytes of sampled taps per band of LR rows: small enough to stay in cache-friendly
# pieces (8 to 32 MiB measured the same on 2 cores), bounded whatever the image size.
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resample_torch(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor,
    offsets_v: torch.Tensor,
    scale: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Adaptive resampling (section 2 of the method); arguments as :func:`carcli.ops.resample`."""
    b, c, hh, ww = hr.shape
    taps, h, w = kernels.shape[1:]
    k = kernel_size_of(taps)
    hr_p = reflect_pad(hr, k // 2)
    hp, wp = hr_p.shape[-2:]
    dt, dev = hr.dtype, hr.device
    offsets_h, offsets_v, kernels = (t.to(dt) for t in (offsets_h, offsets_v, kernels))
    # grid_sample's normalised coordinates (align_corners): x_norm = x * ax - 1.
    ax, ay = 2.0 / max(wp - 1, 1), 2.0 / max(hp - 1, 1)
    tap = torch.arange(taps, device=dev)
    u = (tap // k).to(dt).view(taps, 1, 1)  # tap row
    v = (tap % k).to(dt).view(taps, 1, 1)  # tap column
    j = torch.arange(w, device=dev, dtype=dt).view(1, 1, w)
    # Tap (u, v) of LR pixel (i, j) samples the padded image at
    # x = (j + 0.5) * ww / w + v + scale * dx - 0.5 (and y likewise with i, u, dy).
    base_x = ((j + 0.5) * (ww / w) + v - 0.5) * ax - 1.0  # taps x 1 x w

    grad = _needs_grad(hr, kernels, offsets_h, offsets_v)
    out = None if grad else hr.new_empty(b, c, h, w)
    bands = []
    for rows in row_bands(hr, taps, h, w, chunk_bytes):
        n = rows.stop - rows.start
        i = torch.arange(rows.start, rows.stop, device=dev, dtype=dt).view(1, n, 1)
        base_y = ((i + 0.5) * (hh / h) + u - 0.5) * ay - 1.0  # taps x n x 1
        dx, dy = offsets_h[:, :, rows], offsets_v[:, :, rows]
        if grad:
            grid = torch.stack(
                (torch.add(base_x, dx, alpha=scale * ax), torch.add(base_y, dy, alpha=scale * ay)),
                dim=-1,
            )
        else:
            grid = hr.new_empty(b, taps, n, w, 2)
            torch.add(base_x, dx, alpha=scale * ax, out=grid[..., 0])
            torch.add(base_y, dy, alpha=scale * ay, out=grid[..., 1])
        sampled = sample_taps(hr_p, grid)
        weights = kernels[:, :, rows].unsqueeze(1)  # B x 1 x taps x n x w
        if grad:
            bands.append((sampled * weights).sum(dim=2))
        else:
            torch.sum(sampled.mul_(weights), dim=2, out=out[:, :, rows])
    if out is not None:
        return out
    return bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)


def _phase(src: torch.Tensor, p: int, q: int, scale: int) -> torch.Tensor:
    """Rows p, p + s, ... and columns q, q + s, ... of ``src``, contiguous; for an even
    scale, of its 2 x 2 mean (stride 1), made from four strided views of ``src`` without
    the whole-image mean (a 2 MP image's avg_pool2d alone took 25-50 ms on 2 cores)."""
    if scale % 2:
        return src[:, :, p::scale, q::scale].contiguous()
    h, w = src.shape[-2:]
    rows, cols = -(-(h - 1 - p) // scale), -(-(w - 1 - q) // scale)

    def view(dy: int, dx: int) -> torch.Tensor:
        return src[:, :, p + dy :: scale, q + dx :: scale][..., :rows, :cols]

    out = torch.add(view(0, 0), view(0, 1))
    out += view(1, 0)
    out += view(1, 1)
    return out.mul_(0.25).contiguous()  # channels-last input: the sum follows its layout


def resample_fixed(hr: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """:func:`resample_torch` with all offsets zero: each tap at its fixed place.

    Tap (u, v) of LR pixel (i, j) then samples the padded image at
    (i * s + (s - 1) / 2 + u, j * s + (s - 1) / 2 + v): for an even scale the mean of
    the 2 x 2 pixels around that point, for an odd one the pixel itself. So the op is
    one 2 x 2 mean of the image and k*k strided multiply-adds, no sampling grid.
    """
    b, c = hr.shape[:2]
    taps, h, w = kernels.shape[1:]
    k = kernel_size_of(taps)
    src = reflect_pad(hr, k // 2)
    first = (scale - 1) // 2
    kernels = kernels.to(hr.dtype)
    if _needs_grad(hr, kernels):
        if scale % 2 == 0:
            src = F.avg_pool2d(src, 2, stride=1)
        # One unfold (its backward is one fold): 169 small products would make as many
        # autograd nodes, slower than the grid op in training.
        window = src[..., first : first + (h - 1) * scale + k, first : first + (w - 1) * scale + k]
        cols = F.unfold(window, k, stride=scale).view(b, c, taps, h, w)
        return (cols * kernels.unsqueeze(1)).sum(dim=2)
    # The s x s phases of the image, each contiguous: a tap reads a plain window of one.
    phases = [[_phase(src, p, q, scale) for q in range(scale)] for p in range(scale)]
    out = hr.new_zeros(b, c, h, w)
    for u in range(k):
        y = first + u
        for v in range(k):
            x = first + v
            window = phases[y % scale][x % scale][
                :, :, y // scale : y // scale + h, x // scale : x // scale + w
            ]
            out.addcmul_(window, kernels[:, u * k + v].unsqueeze(1))
    return out
