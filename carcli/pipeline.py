"""Downscale, upscale and round trip: on tensors, on pictures, and on folders of files.

Three layers, each replaceable without touching the others or the CLI:

* :class:`Processor` runs a :class:`CARModel` on image tensors
  (``torch.inference_mode``) and knows nothing about files; it runs large
  images tile by tile in bounded memory and picks the precision
  (:mod:`carcli.tiling`);
* ``*_picture`` functions apply it to a :class:`Picture` (alpha, bit depth,
  the source-size note in the PNG text chunks);
* :func:`run_batch` walks :class:`Item` s through a :class:`Task`
  (load -> compute -> save) with decoding and encoding in background threads
  (:mod:`carcli.streaming`), batches equal-size images on a GPU, handles
  errors per file, skips finished outputs, writes atomically and reports
  progress, in input order, to a :class:`Reporter`.

``evaluate_folder`` (for training) and ``car roundtrip`` share one code path.
The public one-call API (:func:`downscale`, :func:`upscale`, :func:`roundtrip`)
is at the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from carcli import metrics
from carcli.defaults import REFINE_MAX_CHANGE
from carcli.imageio import (
    FORMATS,
    SCALE_KEY,
    SOURCE_SIZE_KEY,
    ImageReadError,
    ImageWriteError,
    Picture,
    find_images,
    format_for_suffix,
    is_image_path,
    picture_from_array,
    picture_from_pil,
    read_image,
    to_array,
    write_image,
)
from carcli.models import CARModel, lr_size, quantize
from carcli.ops.reference import reflect_pad
from carcli.refine import refine
from carcli.refine import tile_side as refine_tile_side
from carcli.resize import bicubic_downscale, bicubic_upscale
from carcli.streaming import OrderedWorker, Prefetcher
from carcli.tiling import PrecisionError, TiledModel, is_oom

# The resampler network works at H/8 and reflect-pads there, so it needs sides of
# at least 9 pixels; smaller images are padded to this size first and cropped after.
MIN_SIDE = 16
NOTE_16BIT = (
    "16-bit input is processed in float, but the downscaled image is 8-bit by design: "
    "the SR network is trained on 8-bit LR images"
)
DEBUG_ENV = "CARCLI_DEBUG"  # set to 1 to get tracebacks for per-file failures


class UsageError(ValueError):
    """Arguments that make no sense together (exit code 2); the message is one line."""


class ProcessingError(RuntimeError):
    """One image cannot be processed; the message is one line for the user."""


# --------------------------------------------------------------------------- tensors


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuse devices this machine lacks."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def quantize_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp to [0, 1] and round to the grid a file of ``bits`` per sample holds."""
    if bits == 8:
        return quantize(x)
    if bits > 16:  # float data (tensors from the Python API): no grid to round to
        return x.clamp(0.0, 1.0)
    peak = float(2**bits - 1)
    return torch.round(x.clamp(0.0, 1.0) * peak) / peak


def _pad_small(x: torch.Tensor, min_side: int = MIN_SIDE) -> torch.Tensor:
    """Reflect-pad bottom/right of sides shorter than ``min_side`` (others unchanged)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, min_side - h), max(0, min_side - w)
    if ph == 0 and pw == 0:
        return x
    p = max(ph, pw)
    return reflect_pad(x, p)[..., p : p + h + ph, p : p + w + pw]


def _batched(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected 3xHxW or Bx3xHxW, got {tuple(x.shape)}")
    return x


class Processor:
    """A CAR model on one device, applied to RGB tensors in [0, 1] (no autograd).

    Tensors go in and come out on the CPU (or wherever they are); only tiles
    travel to the device (see :mod:`carcli.tiling`), so any image size runs in
    bounded memory. ``precision`` is ``fp32`` (exact, the default here),
    ``bf16``, ``fp16`` (CUDA) or ``auto`` (the device's fastest sensible
    choice); the resampling op always runs in float32. ``tile`` is the side of
    a tile in output pixels (LR pixels when downscaling, HR when upscaling;
    None: sized from free memory); :attr:`down_tile` and :attr:`up_tile` set
    the two steps separately. ``refine`` > 0 tunes each downscaled image for
    that many steps against the SR network (:mod:`carcli.refine`), each pixel
    within ``refine_max_change`` 8-bit levels of the resampler's output.
    """

    def __init__(
        self,
        model: CARModel,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        tile: int | None = None,
        channels_last: bool = False,
        memory_budget: int | None = None,
        refine: int = 0,
        refine_max_change: int = REFINE_MAX_CHANGE,
    ) -> None:
        device = torch.device(device)
        try:
            self.runner = TiledModel(model, device, precision, channels_last, memory_budget)
        except PrecisionError as exc:
            raise UsageError(str(exc)) from None
        self.device = self.runner.device
        self.model = self.runner.model
        self.precision = self.runner.precision
        self.scale: int = model.scale
        self.down_tile: int | None = tile
        self.up_tile: int | None = tile
        self.refine = refine
        self.refine_max_change = refine_max_change

    def downscale(self, hr: torch.Tensor) -> torch.Tensor:
        """HR (3xHxW or Bx3xHxW) -> LR quantised to 8 bits, ceil(H/s) x ceil(W/s)."""
        squeeze = hr.dim() == 3
        hr = _batched(hr).to(dtype=torch.float32)
        h, w = hr.shape[-2:]
        lh, lw = lr_size(h, w, self.scale)
        with torch.inference_mode():
            x = _pad_small(hr)
            lr = _quantize_(self.runner.downscale(x, self.down_tile)[..., :lh, :lw], 8)
        if self.refine > 0:
            lr = self._refined(lr, hr)
        return lr[0] if squeeze else lr

    def _refined(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        tile = refine_tile_side(self.model, self.runner.memory_budget(), self.precision)
        if self.down_tile is not None:
            tile = min(tile, self.down_tile)
        return refine(
            self.model,
            lr,
            hr,
            self.refine,
            self.refine_max_change,
            tile=tile,
            device=self.device,
            precision=self.precision,
        )

    def upscale(self, lr: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """LR -> HR clamped to [0, 1]: s*h x s*w, or the top-left ``size`` of it."""
        squeeze = lr.dim() == 3
        lr = _batched(lr)
        with torch.inference_mode():
            hr = self.runner.upscale(lr.to(dtype=torch.float32), size, self.up_tile)
        return hr[0] if squeeze else hr

    def roundtrip(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(8-bit LR, reconstruction at the input's size); equal to going through PNG files."""
        lr = self.downscale(hr)
        return lr, self.upscale(lr, size=tuple(hr.shape[-2:]))

    def max_batch(self, height: int, width: int) -> int:
        """How many HR images of this size to run together (more than 1 only on a GPU)."""
        return self.runner.max_batch(height, width)

    def take_notes(self) -> list[str]:
        """Messages for the user collected since the last call (out-of-memory retries)."""
        notes, self.runner.notes = self.runner.notes, []
        return notes


def _quantize_(x: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`quantize_bits` in place, for tensors this module just made (saves two copies)."""
    with torch.inference_mode():  # the processor's outputs are inference tensors
        if bits > 16:
            return x.clamp_(0.0, 1.0)
        peak = float(2**bits - 1)
        return x.clamp_(0.0, 1.0).mul_(peak).round_().div_(peak)


def bicubic_roundtrip(hr: torch.Tensor, scale: int, bits: int = 8) -> torch.Tensor:
    """The classical baseline: MATLAB-style bicubic down (8-bit LR) and up, at ``bits``."""
    lr = quantize(bicubic_downscale(hr.float(), scale))
    return quantize_bits(bicubic_upscale(lr, scale, size=tuple(hr.shape[-2:])), bits)


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
        psnr = metrics.psnr_y(pred, target, shave=scale)
    except ValueError:
        psnr = None
    try:
        ssim = metrics.ssim_y(pred, target, shave=scale)
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
        psnr = metrics.psnr_y(pred[..., rows, :], target[..., rows, :])
        mse = 0.0 if math.isinf(psnr) else metrics.PEAK**2 * 10 ** (-psnr / 10)
        squared += mse * (rows.stop - rows.start) * width
    mse = squared / (height * width)
    psnr = math.inf if mse == 0 else 10 * math.log10(metrics.PEAK**2 / mse)
    win = metrics.SSIM_WINDOW
    total, windows = 0.0, 0
    for start in range(0, height - win + 1, MEASURE_BAND_ROWS):
        rows = slice(start, min(height, start + MEASURE_BAND_ROWS + win - 1))
        count = (rows.stop - rows.start - win + 1) * (width - win + 1)
        total += metrics.ssim_y(pred[..., rows, :], target[..., rows, :]) * count
        windows += count
    return psnr, total / windows


# --------------------------------------------------------------------------- pictures


def _resize_alpha_down(alpha: torch.Tensor, scale: int) -> torch.Tensor:
    """Alpha plane to the LR size with the classical filter, on the 8-bit grid like the LR."""
    return quantize(bicubic_downscale(alpha, scale))


def _resize_alpha_up(alpha: torch.Tensor, scale: int, size: tuple[int, int]) -> torch.Tensor:
    return bicubic_upscale(alpha, scale, size=size).clamp(0.0, 1.0)


def downscale_picture(
    processor: Processor, picture: Picture, lr: torch.Tensor | None = None
) -> Picture:
    """The 8-bit LR picture, its text chunks recording the source size and scale.

    ``lr`` is the processor's result for ``picture.rgb`` when it was computed
    already (in a batch with other pictures of the same size).
    """
    s = processor.scale
    lr = processor.downscale(picture.rgb) if lr is None else lr
    alpha = None if picture.alpha is None else _resize_alpha_down(picture.alpha, s)
    text = {SOURCE_SIZE_KEY: f"{picture.width}x{picture.height}", SCALE_KEY: str(s)}
    return Picture(rgb=lr, alpha=alpha, bits=8, grey=picture.grey, text=text)


def downscale_batch(processor: Processor, pictures: Sequence[Picture]) -> list[torch.Tensor]:
    """LR tensors of equal-size pictures, computed in one pass."""
    if len(pictures) == 1:
        return [processor.downscale(pictures[0].rgb)]
    return list(processor.downscale(torch.stack([p.rgb for p in pictures])).unbind(0))


def upscale_batch(
    processor: Processor, lrs: Sequence[torch.Tensor], size: tuple[int, int] | None
) -> list[torch.Tensor]:
    """Reconstructions of equal-size LR tensors (one target ``size``), in one pass."""
    if len(lrs) == 1:
        return [processor.upscale(lrs[0], size=size)]
    return list(processor.upscale(torch.stack(list(lrs)), size=size).unbind(0))


def restored_size(picture: Picture, scale: int) -> tuple[tuple[int, int] | None, str | None]:
    """(H, W) recorded by ``car downscale`` if it fits this LR at ``scale``, and a warning."""
    raw = picture.text.get(SOURCE_SIZE_KEY)
    if raw is None:
        return None, None
    try:
        width, height = (int(v) for v in raw.lower().split("x"))
    except ValueError:
        return None, f"ignoring unreadable {SOURCE_SIZE_KEY} {raw!r}"
    made_at = picture.text.get(SCALE_KEY)
    if made_at is not None and made_at != str(scale):
        return None, f"was downscaled at {made_at}x, upscaling at {scale}x (size not restored)"
    if lr_size(height, width, scale) != (picture.height, picture.width):
        return (
            None,
            f"{SOURCE_SIZE_KEY} {raw} does not fit this {picture.width}x{picture.height} image",
        )
    return (height, width), None


def upscale_picture(
    processor: Processor,
    picture: Picture,
    size: tuple[int, int] | None = None,
    bits: int | None = None,
    hr: torch.Tensor | None = None,
) -> Picture:
    """The reconstruction (alpha resized classically) at ``bits`` (default: the input's).

    ``hr`` is the processor's result when it was computed already (batched).
    """
    s = processor.scale
    bits = bits or picture.bits
    out_size = size or (picture.height * s, picture.width * s)
    if hr is None:
        hr = processor.upscale(picture.rgb, size=out_size)
    # In place: the processor's output is ours, and a 24 MP float image is 288 MB.
    rgb = _quantize_(hr, bits)
    alpha = None
    if picture.alpha is not None:
        alpha = quantize_bits(_resize_alpha_up(picture.alpha, s, out_size), bits)
    return Picture(rgb=rgb, alpha=alpha, bits=bits, grey=picture.grey)


def roundtrip_picture(
    processor: Processor, picture: Picture, lr: torch.Tensor | None = None
) -> tuple[Picture, Picture]:
    """(LR, reconstruction at the input's size and bit depth).

    For 8-bit inputs this is exactly what ``car downscale`` to PNG followed by
    ``car upscale`` produces; 16-bit inputs keep 16 bits in the reconstruction.
    """
    small = downscale_picture(processor, picture, lr)
    size = (picture.height, picture.width)
    return small, upscale_picture(processor, small, size=size, bits=picture.bits)


# --------------------------------------------------------------------------- batches


@dataclass
class Item:
    """One input file and the files it produces."""

    src: Path
    rel: str  # path relative to INPUT (for messages, reports and mirroring)
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None  # known to fail before any work (name clash, ...)


@dataclass
class Result:
    """What ``Task.compute`` produced for one item."""

    images: dict[str, Picture]
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: Picture | None = None  # the input, when :meth:`Task.finish` still needs it

    @property
    def pixels(self) -> int:
        """Pixels this result keeps in memory (bounds the writer's queue)."""
        pictures = [*self.images.values()] + ([self.source] if self.source else [])
        return sum(p.width * p.height for p in pictures)


@dataclass
class Outcome:
    item: Item
    status: str  # "ok", "failed" or "skipped"
    error: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    pixels: int = 0
    seconds: float = 0.0


@dataclass
class Summary:
    action: str
    total: int
    ok: int
    failed: int
    skipped: int
    seconds: float
    pixels: int


class Reporter(Protocol):
    """Where a batch tells the user what happens (see ``carcli.console``)."""

    def start(self, total: int, label: str) -> None: ...
    def advance(self, outcome: Outcome) -> None: ...
    def error(self, rel: str, reason: str) -> None: ...
    def warn(self, rel: str, message: str) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self, summary: Summary) -> None: ...


class Task:
    """One command's work per file: where outputs go, what to compute, how to save it."""

    action = "processed"  # for the summary line
    label = "processing"  # for the progress bar
    skip_done = True  # skip items whose outputs all exist (unless overwrite)

    def __init__(self, processor: Processor, overwrite: bool = False) -> None:
        self.processor = processor
        self.overwrite = overwrite

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        return {}

    def load(self, item: Item) -> Picture:
        return read_image(item.src)

    def compute(self, item: Item, picture: Picture) -> Result:
        raise NotImplementedError

    def batch_key(self, item: Item, picture: Picture) -> Hashable | None:
        """Pictures with equal keys may be computed together (None: never batched)."""
        return None

    def compute_many(
        self, items: Sequence[Item], pictures: Sequence[Picture]
    ) -> list[Result | Exception]:
        """:meth:`compute` for pictures with one batch key; a failure is returned in its place.

        Subclasses run the networks once for the whole group; if that fails
        (out of memory, say) every picture is retried on its own.
        """
        out: list[Result | Exception] = []
        for item, picture in zip(items, pictures, strict=True):
            try:
                out.append(self.compute(item, picture))
            except Exception as exc:
                out.append(exc)
        return out

    def finish(self, item: Item, result: Result) -> Result:
        """Work after the networks that needs no device (metrics, say).

        Runs in the writer's background thread, right before :meth:`save`, so it
        overlaps the next image's compute.
        """
        return result

    def save(self, item: Item, result: Result) -> None:
        pass


class _WritingTask(Task):
    """Writes one image per input to a folder mirroring INPUT (or to one named file)."""

    def __init__(
        self,
        processor: Processor,
        out_dir: Path | None,
        out_file: Path | None = None,
        fmt: str = "png",
        quality: int = 95,
        overwrite: bool = False,
    ) -> None:
        super().__init__(processor, overwrite)
        self.out_dir, self.out_file, self.fmt, self.quality = out_dir, out_file, fmt, quality

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        if self.out_file is not None:
            return {"image": self.out_file}
        assert self.out_dir is not None
        return {"image": self.out_dir / rel.with_suffix(FORMATS[self.fmt][0])}

    def save(self, item: Item, result: Result) -> None:
        picture = result.images["image"]
        write_image(
            item.outputs["image"],
            picture.rgb,
            picture.alpha,
            fmt=self.fmt,
            bits=picture.bits,
            text=picture.text,
            quality=self.quality,
        )


class DownscaleTask(_WritingTask):
    action, label = "downscaled", "downscaling"

    def compute(self, item: Item, picture: Picture, lr: torch.Tensor | None = None) -> Result:
        small = downscale_picture(self.processor, picture, lr)
        record = _sizes_record(item, picture, small)
        return Result({"image": small}, record, notes=[NOTE_16BIT] if picture.bits == 16 else [])

    def batch_key(self, item: Item, picture: Picture) -> Hashable | None:
        return (picture.height, picture.width)

    def compute_many(
        self, items: Sequence[Item], pictures: Sequence[Picture]
    ) -> list[Result | Exception]:
        lrs = _batch_or_none(lambda: downscale_batch(self.processor, pictures), len(pictures))
        if lrs is None:
            return super().compute_many(items, pictures)
        return [self.compute(i, p, lr) for i, p, lr in zip(items, pictures, lrs, strict=True)]


class UpscaleTask(_WritingTask):
    action, label = "upscaled", "upscaling"

    def compute(self, item: Item, picture: Picture, hr: torch.Tensor | None = None) -> Result:
        size, warning = restored_size(picture, self.processor.scale)
        rec = upscale_picture(self.processor, picture, size, hr=hr)
        return Result(
            {"image": rec}, _sizes_record(item, picture, rec), warnings=[warning] if warning else []
        )

    def batch_key(self, item: Item, picture: Picture) -> Hashable | None:
        return (picture.height, picture.width, restored_size(picture, self.processor.scale)[0])

    def compute_many(
        self, items: Sequence[Item], pictures: Sequence[Picture]
    ) -> list[Result | Exception]:
        s = self.processor.scale
        size = restored_size(pictures[0], s)[0] or (pictures[0].height * s, pictures[0].width * s)
        hrs = _batch_or_none(
            lambda: upscale_batch(self.processor, [p.rgb for p in pictures], size), len(pictures)
        )
        if hrs is None:
            return super().compute_many(items, pictures)
        return [self.compute(i, p, hr) for i, p, hr in zip(items, pictures, hrs, strict=True)]


def _batch_or_none(run: Callable[[], list[torch.Tensor]], count: int) -> list[torch.Tensor] | None:
    """The batched result, or None when there is nothing to batch or the batch failed.

    A failed batch (out of memory, one bad picture) falls back to one picture
    at a time, so every picture gets its own result or error.
    """
    if count < 2:
        return None
    try:
        return run()
    except Exception:
        return None


def _sizes_record(item: Item, src: Picture, out: Picture) -> dict[str, Any]:
    return {
        "file": item.rel,
        "output": str(item.outputs.get("image", "")),
        "width": src.width,
        "height": src.height,
        "output_width": out.width,
        "output_height": out.height,
    }


# Bicubic baseline metrics per (file identity, scale): validation re-reads the same files.
_BICUBIC_CACHE: dict[tuple[str, int, int, int], tuple[float | None, float | None]] = {}


def _file_key(path: Path, scale: int) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, scale)


class RoundtripTask(Task):
    """Downscale, quantise, upscale in memory; measure against the input and bicubic."""

    action, label = "measured", "round trip"
    skip_done = False  # the metrics are the point: every image is measured every time

    def __init__(
        self,
        processor: Processor,
        out_dir: Path | None = None,
        compare: bool = False,
        compare_bicubic: bool = True,
        overwrite: bool = False,
    ) -> None:
        super().__init__(processor, overwrite)
        self.out_dir, self.compare, self.compare_bicubic = out_dir, compare, compare_bicubic
        self.kept = 0  # existing output files left alone (no --overwrite)

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        if self.out_dir is None:
            return {}
        name = rel.with_suffix(".png")
        outputs = {"lr": self.out_dir / "lr" / name, "sr": self.out_dir / "sr" / name}
        if self.compare:
            outputs["compare"] = self.out_dir / "compare" / name
        return outputs

    def batch_key(self, item: Item, picture: Picture) -> Hashable | None:
        return (picture.height, picture.width, picture.bits)

    def compute_many(
        self, items: Sequence[Item], pictures: Sequence[Picture]
    ) -> list[Result | Exception]:
        size = (pictures[0].height, pictures[0].width)

        def both() -> list[torch.Tensor]:
            lrs = downscale_batch(self.processor, pictures)
            return lrs + upscale_batch(self.processor, lrs, size)

        out = _batch_or_none(both, len(pictures))
        if out is None:
            return super().compute_many(items, pictures)
        n = len(pictures)
        return [
            self.compute(i, p, lr, hr)
            for i, p, lr, hr in zip(items, pictures, out[:n], out[n:], strict=True)
        ]

    def compute(
        self,
        item: Item,
        picture: Picture,
        lr: torch.Tensor | None = None,
        hr: torch.Tensor | None = None,
    ) -> Result:
        small = downscale_picture(self.processor, picture, lr)
        size = (picture.height, picture.width)
        rec = upscale_picture(self.processor, small, size=size, bits=picture.bits, hr=hr)
        record: dict[str, Any] = {
            "file": item.rel,
            "width": picture.width,
            "height": picture.height,
        }
        notes = [NOTE_16BIT] if picture.bits == 16 else []
        return Result({"lr": small, "sr": rec}, record, notes=notes, source=picture)

    def finish(self, item: Item, result: Result) -> Result:
        """The metrics, the bicubic baseline and the comparison panel (no networks)."""
        s, picture, rec = self.processor.scale, result.source, result.images["sr"]
        assert picture is not None
        record, images = result.record, result.images
        psnr, ssim = measure(rec.rgb, picture.rgb, s)
        record.update(psnr=psnr, ssim=ssim)
        if self.compare_bicubic or self.compare:
            key = _file_key(item.src, s)
            bicubic = None
            if self.compare or key not in _BICUBIC_CACHE:
                bicubic = bicubic_roundtrip(picture.rgb, s, picture.bits)
                _BICUBIC_CACHE[key] = measure(bicubic, picture.rgb, s)
            if self.compare_bicubic:
                record["bicubic_psnr"], record["bicubic_ssim"] = _BICUBIC_CACHE[key]
            if self.compare and bicubic is not None:
                from carcli.compare import compare_panel

                labels = _compare_labels(record, s)
                panel = compare_panel(picture.rgb, bicubic, rec.rgb, labels)
                images["compare"] = picture_from_array(panel)
        if psnr is None or ssim is None:
            result.notes.append(
                f"images smaller than {2 * s + 11} px on a side get no SSIM "
                f"(and below {2 * s + 1} px no PSNR) after shaving {s} px"
            )
        result.source = None
        return result

    def save(self, item: Item, result: Result) -> None:
        for role, path in item.outputs.items():
            if path.exists() and not self.overwrite:
                self.kept += 1  # the metrics are still fresh; only the file is left alone
                continue
            picture = result.images[role]
            text = picture.text if role == "lr" else None
            write_image(path, picture.rgb, picture.alpha, fmt="png", bits=picture.bits, text=text)


def _compare_labels(record: dict[str, Any], scale: int) -> list[str]:
    def fmt(psnr: float | None, ssim: float | None) -> str:
        if psnr is None:
            return ""
        return f"  {psnr:.2f} dB" + (f" / {ssim:.4f}" if ssim is not None else "")

    return [
        "original",
        f"bicubic x{scale}" + fmt(record.get("bicubic_psnr"), record.get("bicubic_ssim")),
        f"CAR x{scale}" + fmt(record.get("psnr"), record.get("ssim")),
    ]


def collect_inputs(source: Path, recursive: bool = False) -> list[tuple[Path, Path]]:
    """(file, path relative to INPUT) for a file or every image in a folder."""
    source = Path(source)
    if source.is_dir():
        return [(p, p.relative_to(source)) for p in find_images(source, recursive)]
    return [(source, Path(source.name))]


def make_items(task: Task, inputs: Sequence[tuple[Path, Path]]) -> list[Item]:
    """Items with their outputs; name clashes and outputs that are inputs fail up front."""
    sources = {os.path.realpath(src) for src, _ in inputs}
    claimed: dict[str, str] = {}
    items = []
    for src, rel in inputs:
        item = Item(src=src, rel=rel.as_posix(), outputs=task.outputs_for(rel))
        for path in item.outputs.values():
            real = os.path.realpath(path)
            if real in sources:
                item.error = f"refusing to overwrite an input file ({path})"
            elif real in claimed:
                item.error = f"output {path} would also be written for {claimed[real]}; rename one"
            else:
                claimed[real] = item.rel
        items.append(item)
    return items


@dataclass
class _Job:
    """One item on its way through load -> compute -> save."""

    item: Item
    status: str = "pending"  # then "ok", "failed" or "skipped"
    error: str | None = None
    picture: Picture | None = None
    result: Result | None = None
    notes: list[str] = field(default_factory=list)
    pixels: int = 0
    seconds: float = 0.0

    def fail(self, exc: BaseException) -> _Job:
        self.status, self.error = "failed", _failure_message(exc)
        self.picture = self.result = None
        return self

    @property
    def weight(self) -> float:
        """Pixels this job keeps in memory while it waits in a queue."""
        if self.picture is not None:
            return float(self.pixels)
        return float(self.result.pixels) if self.result is not None else 0.0


def _failure_message(exc: BaseException) -> str:
    """One line for the user; re-raises unexpected errors when CARCLI_DEBUG is set."""
    if isinstance(exc, (ImageReadError, ImageWriteError, ProcessingError)):
        return str(exc)
    if is_oom(exc):
        return "out of memory (try --tile with a smaller size, or --device cpu)"
    if os.environ.get(DEBUG_ENV) or not isinstance(exc, Exception):
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _load(task: Task, item: Item) -> _Job:
    """First stage (background thread): skip, fail early or decode."""
    job = _Job(item)
    if item.error:
        job.status, job.error = "failed", item.error
        return job
    if (
        task.skip_done
        and not task.overwrite
        and item.outputs
        and all(p.exists() for p in item.outputs.values())
    ):
        job.status = "skipped"
        return job
    start = time.perf_counter()
    try:
        job.picture = task.load(item)
    except Exception as exc:
        return job.fail(exc)
    finally:
        job.seconds += time.perf_counter() - start
    job.pixels = job.picture.width * job.picture.height
    return job


def _compute(task: Task, jobs: list[_Job]) -> None:
    """Second stage (calling thread): the networks, for a group of equal-size pictures."""
    start = time.perf_counter()
    pictures = [j.picture for j in jobs]
    results = task.compute_many([j.item for j in jobs], pictures)  # type: ignore[arg-type]
    share = (time.perf_counter() - start) / len(jobs)
    take_notes = getattr(task.processor, "take_notes", None)
    jobs[0].notes += take_notes() if take_notes else []
    for job, result in zip(jobs, results, strict=True):
        job.seconds += share
        job.picture = None  # free the input before the job waits for the writer
        if isinstance(result, Exception):
            job.fail(result)
        else:
            job.result = result


def _save(task: Task, job: _Job) -> _Job:
    """Third stage (background thread): finish (metrics), encode and write atomically."""
    if job.status != "pending" or job.result is None:
        return job
    start = time.perf_counter()
    try:
        job.result = task.finish(job.item, job.result)
        task.save(job.item, job.result)
        job.status = "ok"
    except Exception as exc:
        job.fail(exc)
    finally:
        job.seconds += time.perf_counter() - start
    return job


def _groups(task: Task, jobs: Iterator[tuple[Item, _Job]]) -> Iterator[list[_Job]]:
    """Consecutive jobs whose pictures can share one pass of the networks.

    Jobs that need no compute pass through alone. The group size comes from
    the processor (1 on the CPU, where batching gains nothing).
    """
    held: _Job | None = None
    while True:
        if held is None:
            entry = next(jobs, None)
            if entry is None:
                return
            held = entry[1]
        first, held = held, None
        if first.picture is None:
            yield [first]
            continue
        key = task.batch_key(first.item, first.picture)
        limit = (
            1
            if key is None
            else task.processor.max_batch(first.picture.height, first.picture.width)
        )
        group = [first]
        while len(group) < limit:
            entry = next(jobs, None)
            if entry is None:
                break
            job = entry[1]
            if job.picture is None or task.batch_key(job.item, job.picture) != key:
                held = job
                break
            group.append(job)
        yield group


def run_batch(task: Task, items: Sequence[Item], reporter: Reporter) -> list[Outcome]:
    """Process every item, one error line per failure; the batch always continues.

    Decoding runs ahead and encoding/writing behind the compute in background
    threads (bounded queues), so the CPU or GPU does not wait for file I/O.
    Reports come in input order; every output is written once, atomically.
    """
    start = time.perf_counter()
    reporter.start(len(items), task.label)
    outcomes: list[Outcome] = []

    def report(done: list[_Job]) -> None:
        for job in done:
            result = job.result
            for message in job.notes + (result.notes if result else []):
                reporter.note(message)
            for message in result.warnings if result else []:
                reporter.warn(job.item.rel, message)
            outcome = Outcome(job.item, job.status, job.error, seconds=job.seconds)
            if job.status == "ok" and result is not None:
                outcome.record, outcome.pixels = result.record, job.pixels
            if outcome.status == "failed":
                reporter.error(job.item.rel, outcome.error or "failed")
            reporter.advance(outcome)
            outcomes.append(outcome)

    loader = Prefetcher(items, functools.partial(_load, task), weight=lambda j: j.weight)
    writer: OrderedWorker[_Job, _Job] = OrderedWorker(functools.partial(_save, task))
    try:
        try:
            for group in _groups(task, iter(loader)):
                if group[0].status == "pending":
                    _compute(task, group)
                for job in group:
                    writer.submit(job, job.weight)
                report(writer.finished())
            writer.close()
            # finished() hands over the results before a failure and raises it on the
            # next call, so drain until empty: a Ctrl-C in the last writes still counts.
            while done := writer.finished():
                report(done)
        except BaseException:
            # Ctrl-C or a debug re-raise: finish the file being written (atomically),
            # start no other, and still report what was done.
            writer.cancel()
            with contextlib.suppress(BaseException):
                report(writer.finished())
            raise
        finally:
            loader.close()
    finally:  # also on Ctrl-C: stop the progress bar and say what was done
        reporter.finish(summarize(task.action, outcomes, time.perf_counter() - start))
    return outcomes


def summarize(action: str, outcomes: Sequence[Outcome], seconds: float) -> Summary:
    count = lambda status: sum(o.status == status for o in outcomes)  # noqa: E731
    return Summary(
        action=action,
        total=len(outcomes),
        ok=count("ok"),
        failed=count("failed"),
        skipped=count("skipped"),
        seconds=seconds,
        pixels=sum(o.pixels for o in outcomes),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def roundtrip_report(
    outcomes: Sequence[Outcome], scale: int, compare_bicubic: bool = True
) -> dict[str, Any]:
    """The ``--json`` report: means and per-image numbers of the successful images."""
    records = [o.record for o in outcomes if o.status == "ok"]
    keys = ["file", "psnr", "ssim"] + (["bicubic_psnr", "bicubic_ssim"] if compare_bicubic else [])
    report: dict[str, Any] = {
        "scale": scale,
        "count": len(records),
        "psnr": _mean([r["psnr"] for r in records]),
        "ssim": _mean([r["ssim"] for r in records]),
    }
    if compare_bicubic:
        report["baselines"] = {
            "bicubic": {
                "psnr": _mean([r["bicubic_psnr"] for r in records]),
                "ssim": _mean([r["bicubic_ssim"] for r in records]),
            }
        }
    report["images"] = [{k: r[k] for k in keys} for r in records]
    return report


def evaluate_folder(
    model: CARModel,
    folder: Path,
    recursive: bool = False,
    device: torch.device | str = "cpu",
    compare_bicubic: bool = True,
    progress: bool = False,
) -> dict:
    """``car roundtrip FOLDER --json`` without writing files; the report dict it would write.

    Same padding, quantisation, metrics and bicubic baseline as the command.
    The bicubic numbers are cached per (file, scale), so repeated validation
    only pays for the model. The model is returned to its device and mode.
    """
    from carcli.console import ConsoleReporter

    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        task = RoundtripTask(Processor(model, device), compare_bicubic=compare_bicubic)
        items = make_items(task, collect_inputs(Path(folder), recursive))
        outcomes = run_batch(task, items, ConsoleReporter(quiet=not progress))
    finally:
        model.to(home, dtype).train(was_training)
    return roundtrip_report(outcomes, model.scale, compare_bicubic)


# --------------------------------------------------------------------------- one-call API

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor


@functools.lru_cache(maxsize=4)
def _cached_processor(weights: str | None, scale: int, device: str) -> Processor:
    from carcli.checkpoints import load_model

    dev = resolve_device(device)
    model, _ = load_model(Path(weights) if weights else None, scale, dev)
    return Processor(model, dev)


def _processor(weights: Path | str | CARModel | None, scale: int, device: str) -> Processor:
    if isinstance(weights, CARModel):
        if weights.scale != scale:
            raise ValueError(f"the model is for {weights.scale}x, not {scale}x")
        return Processor(weights, resolve_device(device))
    return _cached_processor(str(weights) if weights else None, scale, str(device))


def _refining(processor: Processor, steps: int) -> Processor:
    """The (possibly cached, shared) processor, or a shallow copy of it that refines."""
    if not steps:
        return processor
    processor = copy.copy(processor)
    processor.refine = steps
    return processor


def _picture_of(image: ImageLike) -> tuple[Picture, Callable[[Picture], ImageLike]]:
    """A Picture from the user's object and a function turning results back into that kind."""
    if isinstance(image, Image.Image):
        picture = picture_from_pil(image)
        picture.text.update({k: str(v) for k, v in image.info.items() if k.startswith("carcli:")})

        def back(p: Picture) -> Image.Image:
            array = to_array(p.rgb, p.alpha, 8)
            out = Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB")
            out.info.update(p.text)
            return out

        return picture, back
    if isinstance(image, np.ndarray):
        picture = picture_from_array(image)
        dtype = image.dtype

        def back(p: Picture) -> np.ndarray:
            bits = 16 if dtype == np.uint16 and p.bits == 16 else 8
            if np.issubdtype(dtype, np.floating):
                planes = p.rgb if p.alpha is None else torch.cat([p.rgb, p.alpha])
                return planes.permute(1, 2, 0).numpy().astype(np.float32)
            return to_array(p.rgb, p.alpha, bits)

        return picture, back
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError("tensors must be float 3xHxW in [0, 1]")
        picture = Picture(rgb=image.detach().float().clamp(0, 1).cpu(), bits=32)
        device = image.device
        # clone() outside inference mode: the caller may use the result with autograd
        return picture, lambda p: p.rgb.to(device).clone()
    raise TypeError(f"expected a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def downscale(
    image: ImageLike,
    scale: int = 4,
    weights: Path | str | CARModel | None = None,
    device: str = "auto",
    refine: int = 0,
) -> ImageLike:
    """CAR-downscale a PIL image, HxWx3 uint8/uint16 array or 3xHxW float tensor.

    Returns the same kind, ceil(H/s) x ceil(W/s), on the 8-bit grid (arrays
    come back as uint8: the LR image is 8-bit by design). Store it losslessly.
    ``refine`` as ``car downscale --refine``.
    """
    picture, back = _picture_of(image)
    processor = _refining(_processor(weights, scale, device), refine)
    return back(downscale_picture(processor, picture))


def upscale(
    image: ImageLike,
    scale: int = 4,
    weights: Path | str | CARModel | None = None,
    device: str = "auto",
    size: tuple[int, int] | None = None,
) -> ImageLike:
    """Reconstruct from a CAR-downscaled image; ``size`` = (H, W) crops to the original size.

    A PIL image returned by :func:`downscale` remembers its source size itself.
    """
    picture, back = _picture_of(image)
    if size is None:
        size = restored_size(picture, scale)[0]
    return back(upscale_picture(_processor(weights, scale, device), picture, size))


def roundtrip(
    image: ImageLike,
    scale: int = 4,
    weights: Path | str | CARModel | None = None,
    device: str = "auto",
    refine: int = 0,
) -> ImageLike:
    """Downscale, quantise to 8 bits and upscale in memory; same size and kind as the input."""
    picture, back = _picture_of(image)
    processor = _refining(_processor(weights, scale, device), refine)
    return back(roundtrip_picture(processor, picture)[1])


def check_paths(source: Path, output: Path | None, recursive: bool) -> None:
    """Refuse OUTPUT equal to INPUT, and OUTPUT inside INPUT when outputs would be re-read."""
    if output is None:
        return
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if src == out:
        raise UsageError(
            "OUTPUT is the same as INPUT; choose another OUTPUT (inputs are never overwritten)"
        )
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise UsageError(
                f"INPUT is a folder, so OUTPUT must be a folder, but {output} is a file"
            )
        if recursive and src in out.parents:
            raise UsageError(
                "OUTPUT is inside INPUT and --recursive would read the outputs as inputs; "
                "choose an OUTPUT outside INPUT"
            )


def output_target(
    source: Path, output: Path, fmt: str | None
) -> tuple[Path | None, Path | None, str]:
    """(folder, file, format) for OUTPUT: a file only if INPUT is one and OUTPUT looks like one."""
    if source.is_file() and not output.is_dir() and is_image_path(Path(output.name)):
        try:
            implied = format_for_suffix(output.suffix)
        except ImageWriteError as exc:
            raise UsageError(str(exc)) from None
        if fmt is not None and fmt != implied:
            raise UsageError(f"--format {fmt} contradicts OUTPUT's suffix {output.suffix}")
        return None, output, implied
    return output, None, fmt or "png"
