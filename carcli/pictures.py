"""A :class:`Processor` applied to a :class:`Picture`: alpha, bit depth, the source-size note."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from carcli.engine import Processor
from carcli.imageio import (
    SCALE_KEY,
    SOURCE_SIZE_KEY,
    Picture,
)
from carcli.models import lr_size, quantize
from carcli.models.quantize import quantize_bits, quantize_bits_
from carcli.resize import bicubic_downscale, bicubic_upscale


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


def _clip(value: str, limit: int = 40) -> str:
    """A text-chunk value as a message shows it: quoted, cut to ``limit`` characters.

    The value comes from the file, which can hold kilobytes of anything; the
    message must stay one readable line.
    """
    if len(value) <= limit:
        return value
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def restored_size(picture: Picture, scale: int) -> tuple[tuple[int, int] | None, str | None]:
    """(H, W) recorded by ``car downscale`` if it fits this LR at ``scale``, and a warning."""
    raw = picture.text.get(SOURCE_SIZE_KEY)
    if raw is None:
        return None, None
    try:
        if len(raw) > 40:  # no real size needs more digits; int() of 4300+ digits raises
            raise ValueError(raw)
        width, height = (int(v) for v in raw.lower().split("x"))
    except ValueError:
        shown = repr(raw) if len(raw) <= 40 else _clip(raw)
        return None, f"ignoring unreadable {SOURCE_SIZE_KEY} {shown}"
    made_at = picture.text.get(SCALE_KEY)
    if made_at is not None and made_at != str(scale):
        return (
            None,
            f"was downscaled at {_clip(made_at)}x, upscaling at {scale}x (size not restored)",
        )
    if lr_size(height, width, scale) != (picture.height, picture.width):
        return (
            None,
            f"{SOURCE_SIZE_KEY} {_clip(raw)} does not fit this "
            f"{picture.width}x{picture.height} image",
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
    rgb = quantize_bits_(hr, bits)
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
