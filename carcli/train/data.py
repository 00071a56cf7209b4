"""Training patches: every image decoded once into memory, random augmented crops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carcli.imageio import find_images


def list_images(folders: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for folder in folders:
        if folder.is_file():
            paths.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        paths += find_images(folder, recursive=True)
    return paths


def _load_rgb8(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class PatchSampler:
    """Draws batches of random HR crops with flips and 90-degree rotations.

    Images are kept as uint8 (a few hundred MB for the shared training set);
    images are picked with probability proportional to their area so every
    pixel is equally likely to be seen.
    """

    def __init__(self, folders: list[Path], patch: int, seed: int = 0, quiet: bool = False) -> None:
        self.patch = patch
        self.images: list[torch.Tensor] = []
        self.skipped: list[Path] = []
        self.paths = list_images(folders)
        for path in self.paths:
            img = _load_rgb8(path)
            if min(img.shape[1:]) < patch:
                self.skipped.append(path)
                continue
            self.images.append(img)
        if not self.images:
            raise ValueError(f"no training image is at least {patch}x{patch} in {folders}")
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
            crop = img[:, y : y + p, x : x + p]
            if a & 1:
                crop = crop.flip(-1)
            if a & 2:
                crop = crop.flip(-2)
            if a & 4:
                crop = crop.transpose(-1, -2)
            crops.append(crop)
        return torch.stack(crops).float().div_(255.0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
