"""Side-by-side comparison images (``car roundtrip --compare``), for people who would rather look.

Layout: one labelled column per image (original, bicubic round trip, CAR
round trip); the top row shows the whole image (shrunk for display if large)
with the detail region outlined, the bottom row that region magnified with
nearest-neighbour so individual pixels stay visible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from carcli.metrics import rgb_to_y

MAX_VIEW = 512  # longest side of the whole-image views, in display pixels
GAP = 8
LABEL_HEIGHT = 26
BACKGROUND = (32, 32, 32)
OUTLINE = (255, 64, 64)


def detail_box(rgb: torch.Tensor, side: int) -> tuple[int, int]:
    """Top-left (row, col) of the ``side`` x ``side`` window with the most gradient energy."""
    y = rgb_to_y(rgb.float().unsqueeze(0))[0, 0]
    energy = torch.zeros_like(y)
    energy[:, 1:] += (y[:, 1:] - y[:, :-1]).abs()
    energy[1:, :] += (y[1:, :] - y[:-1, :]).abs()
    stride = max(1, side // 4)
    pooled = F.avg_pool2d(energy[None, None], side, stride=stride)[0, 0]
    index = int(torch.argmax(pooled))
    row, col = divmod(index, pooled.shape[1])
    return row * stride, col * stride


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_pil(rgb: torch.Tensor) -> Image.Image:
    array = torch.round(rgb.detach().float().cpu().clamp(0, 1) * 255).byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def compare_panel(
    original: torch.Tensor,
    bicubic: torch.Tensor,
    car: torch.Tensor,
    labels: list[str],
) -> np.ndarray:
    """An HxWx3 uint8 comparison image of three same-sized 3xHxW tensors in [0, 1]."""
    height, width = original.shape[-2:]
    side = max(1, min(height, width, max(16, min(160, min(height, width) // 4))))
    top, left = detail_box(original, side)

    shrink = min(1.0, MAX_VIEW / max(height, width))
    view_w, view_h = max(1, round(width * shrink)), max(1, round(height * shrink))
    tile_w = max(view_w, 256)
    magnify = max(1, tile_w // side)
    crop_px = side * magnify

    columns = 3
    panel_w = columns * tile_w + (columns + 1) * GAP
    panel_h = LABEL_HEIGHT + view_h + crop_px + 3 * GAP
    panel = Image.new("RGB", (panel_w, panel_h), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    font = _font(15)
    box = (
        int(left * shrink),
        int(top * shrink),
        int((left + side) * shrink),
        int((top + side) * shrink),
    )
    for i, (image, label) in enumerate(zip((original, bicubic, car), labels, strict=True)):
        x0 = GAP + i * (tile_w + GAP)
        draw.text((x0, 4), label, fill=(240, 240, 240), font=font)
        full = _to_pil(image)
        view = full if shrink == 1.0 else full.resize((view_w, view_h), Image.Resampling.LANCZOS)
        y0 = LABEL_HEIGHT
        panel.paste(view, (x0, y0))
        draw.rectangle(
            (x0 + box[0], y0 + box[1], x0 + box[2], y0 + box[3]), outline=OUTLINE, width=2
        )
        crop = full.crop((left, top, left + side, top + side))
        crop = crop.resize((crop_px, crop_px), Image.Resampling.NEAREST)
        panel.paste(crop, (x0, y0 + view_h + GAP))
    return np.asarray(panel)
