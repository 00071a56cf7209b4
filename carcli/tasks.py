"""The three commands' work per file: downscale, upscale, and round trip with its metrics."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from carcli.batch import Item, Result, Task
from carcli.engine import Processor
from carcli.errors import ProcessingError
from carcli.formats import STDIO, is_stdio, output_name
from carcli.imageio import (
    FORMATS,
    Picture,
    picture_from_array,
    write_image,
)
from carcli.metrics import measure
from carcli.pictures import (
    downscale_batch,
    downscale_picture,
    restored_size,
    upscale_batch,
    upscale_picture,
)
from carcli.resize import bicubic_roundtrip
from carcli.runpolicy import available_memory

NOTE_16BIT = (
    "16-bit input is processed in float, but the downscaled image is 8-bit by design: "
    "the SR network is trained on 8-bit LR images"
)


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
        suffix: str = "",
    ) -> None:
        super().__init__(processor, overwrite)
        self.out_dir, self.out_file, self.fmt, self.quality = out_dir, out_file, fmt, quality
        self.suffix = suffix  # added to output names, as Real-ESRGAN's --suffix

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        if self.out_file is not None:
            return {"image": self.out_file}
        assert self.out_dir is not None
        return {"image": self.out_dir / output_name(rel, FORMATS[self.fmt][0], self.suffix)}

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


# Bytes an upscale holds per output pixel at its peak: the float32 RGB result, the
# copy rounded for the file and the encoder's array (alpha adds a little more).
RESULT_BYTES_PER_PIXEL = 32


def _bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


class UpscaleTask(_WritingTask):
    action, label = "upscaled", "upscaling"

    def load(self, item: Item) -> Picture:
        """The LR picture, or a one-line failure when its result cannot fit in memory.

        Tiles bound the networks' memory, but the result is one image: an 8000 x
        8000 LR upscaled 4x is 1 gigapixel, about 30 GB at the peak, and the
        system would kill the whole run without a word.
        """
        picture = super().load(item)
        s = self.processor.scale
        height, width = restored_size(picture, s)[0] or (picture.height * s, picture.width * s)
        need = height * width * RESULT_BYTES_PER_PIXEL
        free = available_memory(torch.device("cpu"))
        if need > free:
            raise ProcessingError(
                f"the result would be {width}x{height} ({height * width / 1e6:.1f} MP, about "
                f"{_bytes(need)} in memory), but only {_bytes(free)} is free"
            )
        return picture

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
    if is_stdio(path):  # standard input: read once per process, so one key is enough
        return (STDIO, 0, 0, scale)
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
        suffix: str = "",
    ) -> None:
        super().__init__(processor, overwrite)
        self.out_dir, self.compare, self.compare_bicubic = out_dir, compare, compare_bicubic
        self.suffix = suffix
        self.kept = 0  # existing output files left alone (no --overwrite)

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        if self.out_dir is None:
            return {}
        name = output_name(rel, ".png", self.suffix)
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
            if path.exists() and not path.is_dir() and not self.overwrite:
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
