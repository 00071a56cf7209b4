"""Training patches: every image decoded once into memory, random augmented crops."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carcli.errors import UsageError, param
from carcli.imageio import IMAGE_SUFFIXES, ImageReadError, find_images


def list_images(folders: list[Path], option: str = "data") -> list[Path]:
    """Every image file in ``folders`` (recursively); UsageError for a missing or empty one."""
    paths: list[Path] = []
    kinds = " ".join(sorted(IMAGE_SUFFIXES))
    for folder in folders:
        if folder.is_file():
            paths.append(folder)
            continue
        if not folder.is_dir():
            raise UsageError(f"{param(option)} {folder}: no such folder")
        found = find_images(folder, recursive=True)
        if not found:
            raise UsageError(f"{param(option)} {folder}: no images in it (looked for {kinds})")
        paths += found
    return paths


def _load_rgb8(path: Path) -> torch.Tensor:
    """The image as 3xHxW uint8; ImageReadError with a one-line reason if it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError:
        raise ImageReadError("image too large to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImageReadError(reason) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def augment(crop: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips and transposes of a square crop (bits of ``code``: x, y, transpose)."""
    if code & 1:
        crop = crop.flip(-1)
    if code & 2:
        crop = crop.flip(-2)
    if code & 4:
        crop = crop.transpose(-1, -2)
    return crop


class PatchSampler:
    """Draws batches of random HR crops with flips and 90-degree rotations.

    Images are kept as uint8 (a few hundred MB for the shared training set);
    images are picked with probability proportional to their area so every
    pixel is equally likely to be seen.
    """

    def __init__(self, folders: list[Path], patch: int, seed: int = 0, quiet: bool = False) -> None:
        self.patch = patch
        self.images: list[torch.Tensor] = []
        self.kept: list[Path] = []  # the file of each image
        self.skipped: list[Path] = []
        self.unreadable: list[Path] = []
        self.paths = list_images(folders)
        for path in self.paths:
            try:
                img = _load_rgb8(path)
            except ImageReadError as exc:  # one damaged file must not end the run
                self.unreadable.append(path)
                if not quiet:
                    print(f"note: skipped {path}: cannot read it ({exc})", file=sys.stderr)
                continue
            if min(img.shape[1:]) < patch:
                self.skipped.append(path)
                continue
            self.images.append(img)
            self.kept.append(path)
        if not self.images:
            names = ", ".join(str(f) for f in folders)
            unreadable = f" ({len(self.unreadable)} unreadable)" if self.unreadable else ""
            raise UsageError(
                f"no readable training image is at least {patch}x{patch} in {names}{unreadable}; "
                f"use larger images or a smaller {param('patch')}"
            )
        if self.skipped and not quiet:
            print(
                f"note: skipped {len(self.skipped)} image(s) smaller than the {patch}px patch",
                file=sys.stderr,
            )
        areas = torch.tensor([float(i.shape[1] * i.shape[2]) for i in self.images])
        self.weights = areas / areas.sum()
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def pixels(self) -> int:
        return int(sum(i.shape[1] * i.shape[2] for i in self.images))

    def batch(self, size: int) -> torch.Tensor:
        """B x 3 x patch x patch float32 in [0, 1]."""
        g, p = self.generator, self.patch
        idx = torch.multinomial(self.weights, size, replacement=True, generator=g).tolist()
        aug = torch.randint(0, 8, (size,), generator=g).tolist()
        crops = []
        for i, a in zip(idx, aug, strict=True):
            img = self.images[i]
            y = int(torch.randint(0, img.shape[1] - p + 1, (1,), generator=g))
            x = int(torch.randint(0, img.shape[2] - p + 1, (1,), generator=g))
            crops.append(augment(img[:, y : y + p, x : x + p], a))
        return torch.stack(crops).float().div_(255.0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
