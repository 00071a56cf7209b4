"""Tiled inference: any image size in bounded memory, stitched back to the untiled result.

Both networks are convolutional, so an output pixel depends only on the input
pixels inside its receptive field. A tile is run on its region grown by a
margin that covers that field, taken from the real image, and only the tile's
interior is kept. The networks' own border padding (reflection in the
resampler and the resampling op, zeros in EDSR) then only ever touches margin
pixels that are thrown away, except at the true image border, where the region
ends exactly where the image ends and the networks pad exactly as in the
untiled run. What is left are float rounding differences (convolution
algorithms depend on the input size), far below one 8-bit level. The margins
are the models' own (:meth:`CARModel.downscale_margin`,
:meth:`SRNetwork.stage_margins`).

Alignment: the resampler pixel-unshuffles three times, so it sees the image as
a grid of 8 x 8 cells; downscale tiles start on that grid (HR origins are
multiples of 8, hence of the scale), so every tile sees the same cells as the
whole image.

The SR network runs in two levels, its two stages (:meth:`SRNetwork.features`
and :meth:`SRNetwork.reconstruct`), because their memory peak and receptive
field can sit in different places. In EDSR the peak is the upsampler, at up to
HR resolution with 4x the channels, and the field is the residual body's, at
LR: large outer tiles carry the wide margin of the body, and the upsampler
walks each outer tile in smaller inner tiles that need a margin of only 2 LR
pixels.

Tile sizes come from a memory budget (free RAM on the CPU, free device memory
on a GPU) and per-pixel activation sizes measured once on a small probe; a
CUDA out-of-memory error retries the image with tiles half the size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from carcli.models import CARModel
from carcli.models.resampler import SIZE_MULTIPLE
from carcli.models.sr import Edges
from carcli.ops.reference import DEFAULT_CHUNK_BYTES
from carcli.runpolicy import default_budget, resolve_precision

# Activations per pixel are multiplied by this: skip connections keep earlier
# maps alive, and oneDNN / cuDNN reorder inputs and keep workspaces.
SAFETY = 2.0
# The pure-PyTorch resampling op works in bands of this many bytes (a few live at once).
OP_FIXED_BYTES = 3 * DEFAULT_CHUNK_BYTES
MIN_DOWN_TILE_HR = 32  # smallest downscale tile, in HR pixels (OOM retries stop here)
MIN_UP_TILE_LR = 8  # smallest upscale tile, in LR pixels


def _peak_elements(modules: list[nn.Module], run: Callable[[], object]) -> int:
    """Largest input + output element count of any leaf module while ``run()`` runs."""
    peak = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal peak
        n = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        n += output.numel() if isinstance(output, torch.Tensor) else 0
        peak = max(peak, n)

    handles = [
        m.register_forward_hook(hook)
        for root in modules
        for m in root.modules()
        if not list(m.children())
    ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return peak


@dataclass(frozen=True)
class Footprint:
    """Bytes per pixel of activations for each stage (at batch size 1)."""

    resampler: float  # per HR input pixel
    sr_body: float  # per LR pixel
    sr_up: float  # per LR pixel (output is scale^2 HR pixels each)

    @classmethod
    def measure(cls, model: CARModel, device: torch.device, precision: str) -> Footprint:
        """Trace a small probe through each stage and scale by element size and SAFETY."""
        size = 4.0 if precision == "fp32" else 2.5  # half activations, some float32 kept
        probe = 64
        hr = torch.zeros(1, 3, probe, probe, device=device)
        lr = torch.zeros(1, 3, probe // 4, probe // 4, device=device)
        res = _peak_elements([model.resampler], lambda: model.resampler(hr))
        sr = model.sr
        feats: list[torch.Tensor] = []
        body = _peak_elements([sr], lambda: feats.append(sr.features(lr)))
        # Inside the image: along its own edges a network may add thin strips (FusedTail).
        up = _peak_elements([sr], lambda: sr.reconstruct(feats[0], edges=(False,) * 4))
        per = lambda n, px: SAFETY * size * n / px  # noqa: E731
        s, taps = model.scale, model.config.kernel_size**2
        # The resampler's three outputs (kernels, dX, dY: k*k values per LR pixel)
        # are all alive at the end, and in float32 for the op (plus the half copies);
        # the HR region is there three times (as given, padded to 8, reflect-padded).
        outputs = 3 * taps / s**2 * (4 + (size if precision != "fp32" else 0))
        # The first stage also keeps an input of its width alive (EDSR: the head
        # output, for the body's skip connection).
        body_px = lr.shape[-1] * lr.shape[-2]
        return cls(
            resampler=per(res, probe * probe) + outputs + 3 * 3 * 4,
            sr_body=per(body, body_px) + size * feats[0].shape[1],
            sr_up=per(up, body_px),
        )


def spans(length: int, tile: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, stop) pieces covering range(length), at most ``tile`` long, starts aligned.

    The pieces are balanced (the last one is not a sliver), which keeps the
    margin overhead even across tiles.
    """
    tile = max(align, tile - tile % align)
    count = max(1, math.ceil(length / tile))
    size = math.ceil(length / count / align) * align
    starts = range(0, length, size)
    return [(a, min(a + size, length)) for a in starts]


def grid(height: int, width: int, tile: int, align: int = 1) -> Iterator[tuple[slice, slice]]:
    """Tiles of at most ``tile`` x ``tile`` covering the image, in raster order."""
    for y0, y1 in spans(height, tile, align):
        for x0, x1 in spans(width, tile, align):
            yield slice(y0, y1), slice(x0, x1)


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing to get memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


@dataclass
class Tiles:
    """Tile sides planned from a memory budget."""

    down: int  # LR pixels of output per downscale tile
    up: int  # HR pixels of output per (outer) upscale tile
    up_inner: int  # LR pixels per upsampler tile inside an outer tile


class TiledModel:
    """A CAR model applied tile by tile on one device, at one precision.

    Inputs and outputs stay where they are (usually the CPU); only tiles travel to
    the device. ``budget`` bounds the bytes the tiles of one image may use
    (default: :func:`default_budget` at each call). Results equal the untiled
    model's up to float rounding; with tiles covering the image the calls are
    exactly the model's own forward passes.
    """

    def __init__(
        self,
        model: CARModel,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        budget: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).float().eval()
        if channels_last:
            # Weights in channels-last make every conv (and its output) channels-last.
            self.model.to(memory_format=torch.channels_last)
        self.budget = budget
        self.down_margin = model.downscale_margin()
        self.body_margin, self.up_margin = model.sr.stage_margins()
        self._footprint: Footprint | None = None
        self.notes: list[str] = []  # things the user should hear about (OOM retries)
        self.oom_cap: int | None = None  # after an OOM, later images use at most this budget

    @property
    def scale(self) -> int:
        return self.model.scale

    # ---- planning --------------------------------------------------------
    @property
    def footprint(self) -> Footprint:
        if self._footprint is None:
            self._footprint = Footprint.measure(self.model, self.device, self.precision)
        return self._footprint

    def memory_budget(self) -> int:
        budget = self.budget if self.budget is not None else default_budget(self.device)
        return min(budget, self.oom_cap) if self.oom_cap is not None else budget

    def plan(self, batch: int = 1, budget: int | None = None) -> Tiles:
        """Largest tiles whose activations fit in the budget (batch images at once)."""
        budget = self.memory_budget() if budget is None else budget
        fp, s = self.footprint, self.scale
        usable = max(budget - (OP_FIXED_BYTES if self.device.type == "cpu" else 0), budget // 4)
        side = lambda bpp: math.isqrt(int(usable / (bpp * batch)))  # noqa: E731
        down_hr = side(fp.resampler) - 2 * self.down_margin
        up_lr = side(fp.sr_body) - 2 * (self.body_margin + self.up_margin)
        inner = side(fp.sr_up) - 2 * self.up_margin
        return Tiles(
            down=max(down_hr, MIN_DOWN_TILE_HR) // s,
            up=max(up_lr, MIN_UP_TILE_LR) * s,
            up_inner=max(inner, MIN_UP_TILE_LR),
        )

    def max_batch(self, height: int, width: int, limit: int = 16) -> int:
        """How many HR images of this size fit untiled in one pass (1 on the CPU)."""
        if self.device.type == "cpu":
            return 1
        fp, budget = self.footprint, self.memory_budget()
        per_image = max(
            fp.resampler * height * width,
            fp.sr_up * height * width / self.scale**2,
        )
        return max(1, min(limit, int(budget // max(per_image, 1.0))))

    # ---- running ---------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32, non_blocking=True)

    def _checked(self, fn: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Run ``fn(precision)``; redo it in fp32 if half precision overflowed."""
        out = fn(self.precision)
        if self.precision == "fp16" and not bool(torch.isfinite(out).all()):
            out = fn("fp32")
        return out

    def _downscale_region(self, region: torch.Tensor) -> torch.Tensor:
        def run(precision: str) -> torch.Tensor:
            return self.model.downscale_mixed(region, precision)

        return self._checked(run)

    def downscale(self, hr: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """B x 3 x H x W HR -> float LR (not quantised), ceil(H/s) x ceil(W/s).

        ``tile`` is the side of a tile in LR pixels (None: from the memory budget).
        """
        return self._retrying(
            lambda t: self._downscale(hr, t),
            tile,
            "down",
            hr.shape[0],
            MIN_DOWN_TILE_HR // self.scale,
        )

    def _downscale(self, hr: torch.Tensor, tile: int) -> torch.Tensor:
        s, m = self.scale, self.down_margin
        b, c, h, w = hr.shape
        lh, lw = math.ceil(h / s), math.ceil(w / s)
        if tile >= lh and tile >= lw:  # one tile: the model's own forward pass
            return self._downscale_region(self._to_device(hr)).to(hr.device)
        out = torch.empty(b, c, lh, lw, dtype=torch.float32, device=hr.device)
        for rows, cols in grid(lh, lw, tile, align=SIZE_MULTIPLE // s):
            y0, x0 = max(0, rows.start * s - m), max(0, cols.start * s - m)
            y1, x1 = min(h, rows.stop * s + m), min(w, cols.stop * s + m)
            lr = self._downscale_region(self._to_device(hr[..., y0:y1, x0:x1]))
            oy, ox = rows.start - y0 // s, cols.start - x0 // s
            out[..., rows, cols] = lr[
                ..., oy : oy + rows.stop - rows.start, ox : ox + cols.stop - cols.start
            ].to(out.device)
        return out

    def upscale(
        self, lr: torch.Tensor, size: tuple[int, int] | None = None, tile: int | None = None
    ) -> torch.Tensor:
        """B x 3 x h x w LR -> HR clamped to [0, 1]: s*h x s*w, or its top-left ``size``.

        ``tile`` is the side of an outer tile in HR pixels (None: from the budget).
        """
        s = self.scale
        size = size or (lr.shape[-2] * s, lr.shape[-1] * s)
        return self._retrying(
            lambda t: self._upscale(lr, size, t), tile, "up", lr.shape[0], MIN_UP_TILE_LR * s
        )

    def _upscale_tail(self, feats: torch.Tensor, edges: Edges) -> torch.Tensor:
        def run(precision: str) -> torch.Tensor:
            x = feats if precision == self.precision else feats.float()
            return self.model.sr.reconstruct(x, precision, edges)

        return self._checked(run)

    def _features(self, lr: torch.Tensor) -> torch.Tensor:
        def run(precision: str) -> torch.Tensor:
            return self.model.sr.features(lr, precision)

        return self._checked(run)

    def _upscale(self, lr: torch.Tensor, size: tuple[int, int], tile: int) -> torch.Tensor:
        s, mb, mu = self.scale, self.body_margin, self.up_margin
        b, c, h, w = lr.shape
        big, bw = min(size[0], h * s), min(size[1], w * s)
        need_h, need_w = math.ceil(big / s), math.ceil(bw / s)  # LR rows/cols the crop needs
        outer = max(1, tile // s)
        inner = min(self.plan(batch=b).up_inner, outer)
        out = torch.empty(b, c, big, bw, dtype=torch.float32, device=lr.device)
        for rows, cols in grid(need_h, need_w, outer):
            # Features are exact on the tile plus the upsampler's margin.
            fy0, fx0 = max(0, rows.start - mu), max(0, cols.start - mu)
            fy1, fx1 = min(h, rows.stop + mu), min(w, cols.stop + mu)
            y0, x0 = max(0, fy0 - mb), max(0, fx0 - mb)
            y1, x1 = min(h, fy1 + mb), min(w, fx1 + mb)
            feats = self._features(self._to_device(lr[..., y0:y1, x0:x1]))
            feats = feats[..., fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
            for irows, icols in grid(rows.stop - rows.start, cols.stop - cols.start, inner):
                gy0, gy1 = rows.start + irows.start, rows.start + irows.stop
                gx0, gx1 = cols.start + icols.start, cols.start + icols.stop
                ry0, rx0 = max(fy0, gy0 - mu), max(fx0, gx0 - mu)
                ry1, rx1 = min(fy1, gy1 + mu), min(fx1, gx1 + mu)
                edges = (ry0 == 0, ry1 == h, rx0 == 0, rx1 == w)
                hr = self._upscale_tail(
                    feats[..., ry0 - fy0 : ry1 - fy0, rx0 - fx0 : rx1 - fx0], edges
                )
                oy0, ox0 = gy0 * s, gx0 * s
                oy1, ox1 = min(gy1 * s, big), min(gx1 * s, bw)
                piece = hr[..., oy0 - ry0 * s : oy1 - ry0 * s, ox0 - rx0 * s : ox1 - rx0 * s]
                out[..., oy0:oy1, ox0:ox1] = piece.clamp(0.0, 1.0).to(out.device)
            del feats
        return out

    def _retrying(
        self,
        run: Callable[[int], torch.Tensor],
        tile: int | None,
        kind: str,
        batch: int,
        least: int,
    ) -> torch.Tensor:
        """Run with the given or planned tile; on out-of-memory halve it and run again."""
        budget = self.memory_budget()
        while True:
            current = tile if tile is not None else getattr(self.plan(batch, budget), kind)
            try:
                return run(current)
            except Exception as exc:
                if not is_oom(exc) or (current <= least and budget <= 1 << 20):
                    raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            # Halve both the explicit tile and the budget that sizes the inner tiles.
            budget = max(budget // 4, 1 << 20)
            self.oom_cap = budget
            if tile is not None:
                tile = max(least, tile // 2)
            self.notes.append(
                "ran out of memory; retrying with smaller tiles (a tile size can be set)"
            )
