"""The networks on tensors: :class:`Processor`, a CAR model on one device, tile by tile.

A processor runs a :class:`CARModel` on image tensors (``torch.inference_mode``)
and knows nothing about files; large images run tile by tile in bounded memory
(:mod:`carcli.tiler`) at the precision the run policy picked
(:mod:`carcli.runpolicy`).
"""

from __future__ import annotations

import torch

from carcli.defaults import REFINE_MAX_CHANGE
from carcli.errors import ProcessingError
from carcli.models import CARModel, lr_size
from carcli.models.quantize import quantize_bits_
from carcli.ops.reference import reflect_pad
from carcli.refine import refine
from carcli.refine import tile_side as refine_tile_side
from carcli.runpolicy import RunPolicy, resolve_device
from carcli.tiler import TiledModel

# The resampler network works at H/8 and reflect-pads there, so it needs sides of
# at least 9 pixels; smaller images are padded to this size first and cropped after.
MIN_SIDE = 16


def _finite(x: torch.Tensor, network: str) -> torch.Tensor:
    """``x``, or ProcessingError if the network produced NaN or infinity (never a black image).

    Weights are checked when they load; this catches what is left (an overflow
    in half precision, a damaged model passed in through the Python API).
    """
    if not bool(torch.isfinite(x).all()):
        raise ProcessingError(
            f"the {network} network produced NaN or infinite values (damaged weights, or an "
            "overflow at reduced precision: try --precision fp32)"
        )
    return x


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
    travel to the device (see :mod:`carcli.tiler`), so any image size runs in
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
        # A precision the device lacks raises PrecisionError, a UsageError.
        self.runner = TiledModel(model, device, precision, channels_last, memory_budget)
        self.device = self.runner.device
        self.model = self.runner.model
        self.precision = self.runner.precision
        self.down_tile: int | None = tile
        self.up_tile: int | None = tile
        self.refine = refine
        self.refine_max_change = refine_max_change

    @property
    def scale(self) -> int:
        return self.model.scale

    def downscale(self, hr: torch.Tensor) -> torch.Tensor:
        """HR (3xHxW or Bx3xHxW) -> LR quantised to 8 bits, ceil(H/s) x ceil(W/s)."""
        squeeze = hr.dim() == 3
        hr = _batched(hr).to(dtype=torch.float32)
        h, w = hr.shape[-2:]
        lh, lw = lr_size(h, w, self.scale)
        with torch.inference_mode():
            x = _pad_small(hr)
            lr = _finite(self.runner.downscale(x, self.down_tile)[..., :lh, :lw], "resampler")
            lr = quantize_bits_(lr, 8)
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
            hr = _finite(self.runner.upscale(lr.to(dtype=torch.float32), size, self.up_tile), "SR")
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


def build_processor(
    model: CARModel,
    policy: RunPolicy | None = None,
    refine: int = 0,
    refine_max_change: int = REFINE_MAX_CHANGE,
) -> Processor:
    """The one way a model is set up to run: ``car``, the API, validation, timing, benches.

    Applies ``policy`` (device, CPU threads, precision, channels-last, tiles,
    memory budget; see :class:`RunPolicy`) to ``model``, which moves to the
    device and into eval mode. Default policy: :class:`RunPolicy`'s defaults, as ``car``.
    """
    policy = policy or RunPolicy()
    device = resolve_device(policy.device)
    policy.apply_threads(device)
    return Processor(
        model,
        device,
        policy.precision,
        tile=policy.tile,
        channels_last=policy.channels_last,
        memory_budget=policy.memory_budget,
        refine=refine,
        refine_max_change=refine_max_change,
    )
