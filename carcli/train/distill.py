"""Distillation: a trained pair (the teacher) supplies targets for a new, cheaper pair.

When the student's resampler is frozen, its LR images never change, and neither do the
teacher's reconstructions: both are computed once per training image, on the whole image
through the inference engine (so they are exactly what `car` would produce), and cached on
disk. A training step is then only the student SR network's forward and backward pass on
LR/HR/teacher crops, several times cheaper than a joint step that also runs the resampler
and the teacher.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from carcli.models import CARModel
from carcli.train.data import augment

CACHE_VERSION = 1


def state_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights, to key cached outputs by the network that made them."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _image_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]


def _processor(model: CARModel, device: torch.device, precision: str = "auto"):  # noqa: ANN202
    """The inference engine, as `car` builds it, on the trainer's device and thread count.

    ``auto``: the device's default precision, what `car` itself runs there.
    """
    from carcli.engine import build_processor
    from carcli.runpolicy import RunPolicy

    policy = RunPolicy(device=device, precision=precision, threads=torch.get_num_threads())
    return build_processor(model, policy)


class DistillCache:
    """Per training image: the student resampler's 8-bit LR and the teacher's round trip.

    Files live in ``folder`` (one per image, keyed by the image file and both networks'
    weights), so runs that share a resampler and a teacher share the cache.
    """

    label = "teacher targets"

    def __init__(
        self, folder: Path, student: CARModel, teacher: CARModel, device: torch.device
    ) -> None:
        self.folder = folder
        self.device = device
        self.student = student
        self.teacher = teacher
        own, theirs = state_digest(student.resampler), state_digest(teacher.resampler)
        self.shared = own == theirs  # the usual case: one downscale serves both
        precision = _processor(teacher, device).precision
        self.key = f"v{CACHE_VERSION}-{own}-{state_digest(teacher)}-{precision}"
        self._down = None
        self._round = None

    def entry(self, path: Path, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR uint8 3 x ceil(H/s) x ceil(W/s), teacher float16 3 x H x W) for one image."""
        file = self.folder / f"{_image_key(path)}-{self.key}.pt"
        if file.is_file():
            with _suppress_bad_cache(file):
                data = torch.load(file, map_location="cpu", weights_only=True)
                return data["lr"], data["teacher"]
        if self._down is None:
            self._down = _processor(self.student, self.device)
            self._round = _processor(self.teacher, self.device)
        x = hr.float().div(255.0)
        theirs, teacher = self._round.roundtrip(x)  # clamped to [0, 1]: what a user gets
        lr = theirs if self.shared else self._down.downscale(x)
        lr8 = torch.round(lr * 255.0).clamp(0, 255).to(torch.uint8)
        out = teacher.to(torch.float16)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"lr": lr8, "teacher": out}, tmp)
        tmp.replace(file)
        return lr8, out


class BicubicCache:
    """Per training image: its 8-bit bicubic (MATLAB ``imresize``) LR, and no teacher.

    For the generic upscaler, trained on the LR images people already have rather than on
    a resampler's; computed on the whole image so crops carry no border effects.
    """

    label = "bicubic LR images"

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def entry(self, path: Path, hr: torch.Tensor) -> tuple[torch.Tensor, None]:
        from carcli.resize import bicubic_downscale

        lr = bicubic_downscale(hr.float().div(255.0), self.scale)
        return torch.round(lr.clamp(0.0, 1.0) * 255.0).to(torch.uint8), None


class _suppress_bad_cache:  # noqa: N801
    """A damaged cache file is rebuilt, not fatal."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is not None and isinstance(exc, Exception):
            print(f"note: rebuilding damaged cache file {self.file}", file=sys.stderr)
            self.file.unlink(missing_ok=True)
            return False
        return False


class DistillSampler:
    """Random aligned crops of (LR, HR, teacher) with the same flips and transposes.

    Wraps the decoded training images of a :class:`~carcli.train.data.PatchSampler` (same
    area-weighted choice of image, same generator, so it resumes the same way).
    """

    def __init__(self, base, cache, scale: int, quiet: bool = False) -> None:  # noqa: ANN001
        self.base = base
        self.scale = scale
        self.patch = base.patch
        if self.patch % scale:
            raise ValueError(f"patch {self.patch} is not a multiple of the scale {scale}")
        self.entries: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        paths = base.kept
        live = not quiet and sys.stderr.isatty()  # a log file gets one line, not one per image
        for i, (path, img) in enumerate(zip(paths, base.images, strict=True)):
            if live:
                print(f"\r{cache.label}: {i + 1}/{len(paths)} {path.name}", end="", file=sys.stderr)
            self.entries.append(cache.entry(path, img))
        if live:
            print(file=sys.stderr)
        elif not quiet:
            print(f"{cache.label}: {len(paths)} images ready", file=sys.stderr)

    @property
    def images(self) -> list[torch.Tensor]:
        return self.base.images

    @property
    def pixels(self) -> int:
        return self.base.pixels

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(LR B x 3 x p/s x p/s, HR B x 3 x p x p, teacher B x 3 x p x p or None), float32."""
        g, p, s = self.base.generator, self.patch, self.scale
        q = p // s
        idx = torch.multinomial(self.base.weights, size, replacement=True, generator=g).tolist()
        aug = torch.randint(0, 8, (size,), generator=g).tolist()
        lrs, hrs, ts = [], [], []
        for i, a in zip(idx, aug, strict=True):
            img = self.base.images[i]
            lr, teacher = self.entries[i]
            ly = int(torch.randint(0, (img.shape[1] - p) // s + 1, (1,), generator=g))
            lx = int(torch.randint(0, (img.shape[2] - p) // s + 1, (1,), generator=g))
            crops = [
                lr[:, ly : ly + q, lx : lx + q],
                img[:, s * ly : s * ly + p, s * lx : s * lx + p],
            ]
            if teacher is not None:
                crops.append(teacher[:, s * ly : s * ly + p, s * lx : s * lx + p])
            crops = [augment(c, a) for c in crops]  # the same for all three
            lrs.append(crops[0])
            hrs.append(crops[1])
            ts += crops[2:]
        lr = torch.stack(lrs).float().div_(255.0)
        hr = torch.stack(hrs).float().div_(255.0)
        return lr, hr, torch.stack(ts).float() if ts else None

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def evaluate_on_bicubic(model: CARModel, folder: Path, device: torch.device) -> dict[str, float]:
    """Mean Y-PSNR / SSIM of the SR network alone on 8-bit bicubic LR images (generic upscaler).

    The benchmark convention of the SR literature: LR = MATLAB ``imresize(HR, 1/s)`` rounded
    to 8 bits, the reconstruction cropped to the HR size, ``s`` pixels shaved.
    """
    import numpy as np
    from PIL import Image

    from carcli.imageio import find_images
    from carcli.metrics import measure
    from carcli.resize import bicubic_downscale

    processor = _processor(model, device, precision="fp32")
    psnrs, ssims = [], []
    for path in find_images(folder):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        hr = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)
        lr = torch.round(bicubic_downscale(hr, model.scale).clamp(0, 1) * 255.0) / 255.0
        sr = processor.upscale(lr, size=tuple(hr.shape[-2:]))
        sr = torch.round(sr * 255.0) / 255.0
        psnr, ssim = measure(sr[None], hr[None], model.scale)
        psnrs.append(psnr)
        ssims.append(ssim)
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
