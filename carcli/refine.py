"""Encoder-side refinement: search for the 8-bit LR image the SR network restores best.

The resampler predicts a good LR image in one pass, but at downscale time the
original and the SR network are both at hand, so the LR pixels can be tuned
further by gradient descent on the reconstruction error, through the real 8-bit
rounding (straight-through gradient). Every pixel stays within ``max_change``
8-bit levels of the resampler's output, so the downscaled image looks the same;
only what the SR network reads from it improves. It costs a forward and a
backward pass of the SR network per step, so it is opt-in (``--refine N``).

Large images are refined tile by tile on one shared LR image, in raster order:
each tile tunes only its own pixels, with its neighbours (already refined or
not) as fixed context, and scores the HR region its pixels influence. The
best step of each tile is kept, so a tile never ends worse than it started on
the region it scores.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from carcli.defaults import REFINE_MAX_CHANGE
from carcli.models import CARModel
from carcli.models.quantize import quantize_for_training
from carcli.tiler import grid

DEFAULT_STEP = 0.002  # Adam step, in [0, 1] units (about half an 8-bit level)
# Around a tile, SCORED LR pixels whose reconstruction is also scored (the tile's
# pixels change it), then CONTEXT more fed to the SR network as fixed input. EDSR's
# theoretical reach is larger (SRNetwork.margin), but an LR pixel's influence
# fades within a few pixels; these only decide how well seams are tuned.
SCORED = 8
CONTEXT = 12


def tile_side(model: CARModel, budget: int, precision: str = "fp32") -> int:
    """LR side of a tuned tile whose forward and backward passes fit in ``budget`` bytes.

    Autograd keeps the SR network's activations
    (:meth:`SRNetwork.autograd_elements_per_pixel`), doubled here for the
    backward pass's temporaries.
    """
    per_pixel = model.sr.autograd_elements_per_pixel()
    size = 4 if precision == "fp32" else 3
    side = math.isqrt(int(budget / (2 * size * per_pixel)))
    return max(16, side - 2 * (CONTEXT + SCORED))


def refine_tile(
    model: CARModel,
    lr: torch.Tensor,
    hr: torch.Tensor,
    free: tuple[slice, slice],
    steps: int,
    max_change: int = REFINE_MAX_CHANGE,
    step_size: float = DEFAULT_STEP,
    scored: tuple[slice, slice] | None = None,
    precision: str = "fp32",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tune ``lr[..., free]`` (1 x 3 x h x w, on the 8-bit grid) against ``hr`` (s*h x s*w).

    ``scored`` (LR coordinates, default: everything) is where the squared error
    is counted, in HR pixels, weighted by ``mask`` (1 x 1 x s*h x s*w, default
    all ones: 0 where the target is padding). Returns the tuned LR (a new tensor); pixels
    outside ``free`` are unchanged.
    """
    s = model.scale
    rows, cols = free
    base = lr[..., rows, cols]
    lo = (base - max_change / 255.0).clamp(0.0, 1.0)
    hi = (base + max_change / 255.0).clamp(0.0, 1.0)
    sy, sx = scored or (slice(0, lr.shape[-2]), slice(0, lr.shape[-1]))
    region = (slice(sy.start * s, sy.stop * s), slice(sx.start * s, sx.stop * s))
    target = hr[..., region[0], region[1]]
    weight = torch.ones_like(target[:, :1]) if mask is None else mask[..., region[0], region[1]]
    total = weight.sum().clamp(min=1.0) * target.shape[1]
    z = base.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=step_size)
    best_loss, best = math.inf, base
    for i in range(steps + 1):
        q = quantize_for_training(z)
        full = lr.clone()
        full[..., rows, cols] = q
        out = model.sr.forward_mixed(full, precision)
        err = out[..., region[0], region[1]].float() - target
        loss = (err.square() * weight).sum() / total
        if loss.item() < best_loss:
            best_loss, best = loss.item(), q.detach().clone()
        if i == steps:
            break
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad
        opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, hi), lo))
    result = lr.clone()
    result[..., rows, cols] = best
    return result


@contextlib.contextmanager
def weights_frozen(module: nn.Module) -> Iterator[None]:
    """Gradients for the LR pixels only: autograd then leaves the weights out of the graph,
    and EDSR can run its tail as one convolution (:class:`carcli.models.edsr.FusedTail`)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def refine(
    model: CARModel,
    lr: torch.Tensor,
    hr: torch.Tensor,
    steps: int,
    max_change: int = REFINE_MAX_CHANGE,
    tile: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    step_size: float = DEFAULT_STEP,
) -> torch.Tensor:
    """The refined 8-bit LR image for ``hr`` (B x 3 x H x W, H and W multiples of s or not).

    ``lr`` is the resampler's 8-bit output, ceil(H/s) x ceil(W/s); ``tile`` is
    the side of the tuned region in LR pixels (None: the whole image). Runs on
    ``device`` at ``precision`` (as the upscale does); returns a CPU tensor.
    """
    if steps <= 0:
        return lr
    device = torch.device(device)
    s = model.scale
    b, _, h, w = lr.shape
    # The SR output covers s*h x s*w; only its top-left H x W is the user's image.
    mask = torch.zeros(1, 1, h * s, w * s, device=device)
    mask[..., : hr.shape[-2], : hr.shape[-1]] = 1.0
    pad = (0, w * s - hr.shape[-1], 0, h * s - hr.shape[-2])
    out = []
    with torch.inference_mode(False), torch.enable_grad(), weights_frozen(model):
        for i in range(b):
            cur = lr[i : i + 1].clone().to(device)
            target = torch.nn.functional.pad(hr[i : i + 1].clone().to(device), pad)
            for rows, cols in grid(h, w, tile or max(h, w)):
                (y0, y1), (x0, x1) = (rows.start, rows.stop), (cols.start, cols.stop)
                cy0, cx0 = max(0, y0 - CONTEXT - SCORED), max(0, x0 - CONTEXT - SCORED)
                cy1, cx1 = min(h, y1 + CONTEXT + SCORED), min(w, x1 + CONTEXT + SCORED)
                free = (slice(y0 - cy0, y1 - cy0), slice(x0 - cx0, x1 - cx0))
                scored = (
                    slice(max(cy0, y0 - SCORED) - cy0, min(cy1, y1 + SCORED) - cy0),
                    slice(max(cx0, x0 - SCORED) - cx0, min(cx1, x1 + SCORED) - cx0),
                )
                hr_window = (slice(cy0 * s, cy1 * s), slice(cx0 * s, cx1 * s))
                tuned = refine_tile(
                    model,
                    cur[..., cy0:cy1, cx0:cx1],
                    target[..., hr_window[0], hr_window[1]],
                    free,
                    steps,
                    max_change,
                    step_size,
                    scored,
                    precision,
                    mask[..., hr_window[0], hr_window[1]],
                )
                cur[..., y0:y1, x0:x1] = tuned[..., free[0], free[1]]
            out.append(cur.cpu())
    return torch.cat(out)
