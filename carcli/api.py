"""The one-call Python API: :func:`downscale`, :func:`upscale`, :func:`roundtrip`.

The functions run the model as ``car`` does, through the same run policy
(:class:`carcli.runpolicy.RunPolicy`): ``precision="auto"`` picks fp16 on
CUDA, bf16 on CPUs with native bfloat16 and fp32 elsewhere, and the weights
run channels-last, so ``carcli.roundtrip(image)`` gives the numbers
``car roundtrip`` prints. Pass ``precision="fp32"`` for exact float32. One
difference: the API leaves the process's CPU thread count alone unless
``threads`` is given (``car`` picks the cores not busy).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from carcli.engine import Processor, build_processor
from carcli.imageio import (
    Picture,
    picture_from_array,
    picture_from_pil,
    to_array,
)
from carcli.models import CARModel
from carcli.pictures import downscale_picture, restored_size, roundtrip_picture, upscale_picture
from carcli.runpolicy import RunPolicy, resolve_device

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor


@functools.lru_cache(maxsize=4)
def _cached_processor(
    weights: str | None, scale: int, policy: RunPolicy, upscale_only: bool = False
) -> Processor:
    from carcli.checkpoints import load_model

    device = resolve_device(policy.device)
    model, _ = load_model(Path(weights) if weights else None, scale, device, upscale_only)
    return build_processor(model, policy)


def _processor(
    weights: Path | str | CARModel | None,
    scale: int,
    device: str,
    precision: str,
    threads: int | None,
    upscale_only: bool = False,
) -> Processor:
    """The processor ``car`` would build for these options (the threads default differs).

    ``upscale_only``: a generic upscaler (no resampler) is accepted as ``weights``.
    """
    policy = RunPolicy(str(device), precision, threads="keep" if threads is None else threads)
    if isinstance(weights, CARModel):
        if weights.scale != scale:
            raise ValueError(f"the model is for {weights.scale}x, not {scale}x")
        if weights.sr_only and not upscale_only:
            raise ValueError("the model is a generic upscaler (no resampler): it cannot downscale")
        return build_processor(weights, policy)
    return _cached_processor(str(weights) if weights else None, scale, policy, upscale_only)


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
    precision: str = "auto",
    threads: int | None = None,
) -> ImageLike:
    """CAR-downscale a PIL image, HxWx3 uint8/uint16 array or 3xHxW float tensor.

    Returns the same kind, ceil(H/s) x ceil(W/s), on the 8-bit grid (arrays
    come back as uint8: the LR image is 8-bit by design). Store it losslessly
    with :func:`carcli.save`, which keeps the original size in the PNG (plain
    ``Image.save`` drops it, and a later upscale then rounds the size up)::

        small = carcli.downscale(Image.open("photo.jpg"), scale=4)
        carcli.save(small, "small.png")
        restored = carcli.upscale(Image.open("small.png"), scale=4)  # photo.jpg's size

    ``refine`` as ``car downscale --refine``; ``precision`` and ``threads`` as
    ``--precision`` and ``--threads`` (None: leave torch's thread count alone).
    """
    picture, back = _picture_of(image)
    processor = _refining(_processor(weights, scale, device, precision, threads), refine)
    return back(downscale_picture(processor, picture))


def upscale(
    image: ImageLike,
    scale: int = 4,
    weights: Path | str | CARModel | None = None,
    device: str = "auto",
    size: tuple[int, int] | None = None,
    precision: str = "auto",
    threads: int | None = None,
) -> ImageLike:
    """Reconstruct from a CAR-downscaled image; ``size`` = (H, W) crops to the original size.

    A PIL image returned by :func:`downscale` remembers its source size itself.
    ``precision`` and ``threads`` as for :func:`downscale`.
    """
    picture, back = _picture_of(image)
    if size is None:
        size = restored_size(picture, scale)[0]
    processor = _processor(weights, scale, device, precision, threads, upscale_only=True)
    return back(upscale_picture(processor, picture, size))


def roundtrip(
    image: ImageLike,
    scale: int = 4,
    weights: Path | str | CARModel | None = None,
    device: str = "auto",
    refine: int = 0,
    precision: str = "auto",
    threads: int | None = None,
) -> ImageLike:
    """Downscale, quantise to 8 bits and upscale in memory; same size and kind as the input.

    Options as for :func:`downscale`; the result equals ``car roundtrip``'s with the
    same options.
    """
    picture, back = _picture_of(image)
    processor = _refining(_processor(weights, scale, device, precision, threads), refine)
    return back(roundtrip_picture(processor, picture)[1])
