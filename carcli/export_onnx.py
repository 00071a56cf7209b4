"""Both CAR networks as ONNX graphs, so carcli models run in ONNX Runtime, chaiNNer or a browser.

Two files per scale:

- ``car_x{s}_sr.onnx``: the SR network (EDSR). Input ``lr``, float32 N x 3 x H x W in [0, 1]
  (the 8-bit downscaled image divided by 255), any N, H and W. Output ``hr``, N x 3 x sH x sW,
  not clamped: clamp to [0, 1] and round when saving, as `car upscale` does.
- ``car_x{s}_resampler_{T}.onnx``: the resampler network and the adaptive resampling op, for
  one T x T tile. Input ``hr``, float32 1 x 3 x T x T in [0, 1]; output ``lr``,
  1 x 3 x T/s x T/s on the 8-bit grid (k/255), the image `car downscale` writes. The tile size
  is fixed because the resampling op derives its sampling grid from the input size, which a
  dynamic export freezes at the example's size (wrong sizes for any other input). Larger images
  must be split into overlapping tiles (carcli's own tiler uses a margin of
  ``CARModel.downscale_margin()`` HR pixels), or exported at their own size.

The graphs come from PyTorch's ``torch.export``-based exporter (the ``onnx`` extra installs it:
onnx, onnxscript, and onnxruntime to check the result); each file records carcli's version, the
scale and the SHA-256 of the weights it came from in its metadata.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carcli.models.car import CARModel
from carcli.models.quantize import quantize
from carcli.models.resampler import SIZE_MULTIPLE

OPSET = 18  # GridSample needs 16+; 18 is what ONNX Runtime (native and web) and chaiNNer read
DEFAULT_TILE = 256
EXTRA_HINT = "pip install 'carcli[onnx]' (onnx, onnxscript and onnxruntime)"


class OnnxExportError(Exception):
    """An export that cannot run (missing packages, a bad tile size); one line for the user."""


@dataclass
class Exported:
    """One written graph and how closely ONNX Runtime reproduces PyTorch on a random input."""

    path: Path
    network: str  # "sr" or "resampler"
    input_shape: str
    max_abs_error: float | None = None  # None when onnxruntime is not installed
    # Share of output samples more than 1e-5 from PyTorch's: for the resampler, LR samples
    # whose float value lay within float error of a rounding tie land one level (1/255) apart.
    mismatch: float | None = None
    checked_shape: tuple[int, ...] | None = None


class _SR(nn.Module):
    def __init__(self, model: CARModel) -> None:
        super().__init__()
        self.sr = model.sr

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.sr(lr)


class _Downscale(nn.Module):
    def __init__(self, model: CARModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        return quantize(self.model.downscale(hr))


def check_tile(tile: int, scale: int) -> None:
    """The resampler works on sides that are multiples of 8 (and of the scale), 16 at least."""
    step = max(SIZE_MULTIPLE, scale)
    if tile < 2 * SIZE_MULTIPLE or tile % step:
        raise OnnxExportError(
            f"--tile must be a multiple of {step} and at least {2 * SIZE_MULTIPLE}, got {tile}"
        )


def _require_exporter() -> None:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError as exc:
            raise OnnxExportError(f"ONNX export needs {module}: {EXTRA_HINT}") from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs and warns about things that do not concern carcli's graphs
    (torchvision ops it skips, deprecations inside torch); keep the user's terminal clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_name: str,
    dynamic: dict[int, Any] | None,
) -> Any:
    """The ONNX ModelProto of ``module`` on ``example`` (dims in ``dynamic`` left free)."""
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes=(dynamic,) if dynamic else None,
            input_names=[input_name],
            output_names=[output_name],
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    return program.model_proto


def _save(proto: Any, path: Path, metadata: dict[str, str]) -> None:
    """Write the graph with carcli's metadata atomically (a temp file renamed into place)."""
    import onnx

    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save_model(proto, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _compare(
    path: Path, input_name: str, x: torch.Tensor, reference: torch.Tensor
) -> tuple[float, float]:
    """(largest absolute difference, share of samples off by more than 1e-5) from PyTorch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {input_name: x.numpy()})
    if tuple(out.shape) != tuple(reference.shape):
        raise OnnxExportError(
            f"{path}: ONNX Runtime gives shape {tuple(out.shape)}, PyTorch {tuple(reference.shape)}"
        )
    diff = (torch.from_numpy(out) - reference).abs()
    return float(diff.max()), float((diff > 1e-5).double().mean())


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def output_paths(folder: Path, scale: int, tile: int) -> tuple[Path, Path]:
    """Where :func:`export_onnx` writes the SR and the resampler graphs."""
    return folder / f"car_x{scale}_sr.onnx", folder / f"car_x{scale}_resampler_{tile}.onnx"


def export_onnx(
    model: CARModel,
    folder: Path,
    tile: int = DEFAULT_TILE,
    metadata: dict[str, str] | None = None,
    check: bool = True,
    seed: int = 0,
) -> list[Exported]:
    """Write the SR network (dynamic N, H, W) and the resampler (one ``tile`` x ``tile``
    tile) of ``model`` into ``folder`` as ONNX; with ``check`` and onnxruntime installed,
    run both in ONNX Runtime on seeded random inputs and record the largest difference
    from PyTorch (the SR check uses a size other than the export example's, so it also
    proves the dynamic axes)."""
    _require_exporter()
    scale = model.scale
    check_tile(tile, scale)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays as it was
    folder.mkdir(parents=True, exist_ok=True)
    sr_path, down_path = output_paths(folder, scale, tile)
    meta = {"producer": "carcli", "scale": str(scale), **(metadata or {})}
    generator = torch.Generator().manual_seed(seed)

    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: torch.export.Dim("height", min=2, max=16384),
        3: torch.export.Dim("width", min=2, max=16384),
    }
    example = torch.rand(2, 3, 24, 32, generator=generator)
    with torch.no_grad():
        model.sr(example)  # derived inference weights (EDSR's fused tail) made from these weights
    sr_proto = _export(_SR(model), example, "lr", "hr", dims)
    _save(sr_proto, sr_path, {**meta, "network": "sr", "input": "lr: N x 3 x H x W in [0, 1]"})
    down_proto = _export(
        _Downscale(model), torch.rand(1, 3, tile, tile, generator=generator), "hr", "lr", None
    )
    _save(
        down_proto,
        down_path,
        {**meta, "network": "resampler", "input": f"hr: 1 x 3 x {tile} x {tile} in [0, 1]"},
    )
    results = [
        Exported(sr_path, "sr", "lr: N x 3 x H x W (any N, H, W)"),
        Exported(down_path, "resampler", f"hr: 1 x 3 x {tile} x {tile}"),
    ]
    if check and onnxruntime_available():
        lr = torch.rand(1, 3, 37, 45, generator=generator)
        hr = torch.rand(1, 3, tile, tile, generator=generator)
        with torch.no_grad():
            sr_ref, down_ref = model.upscale(lr), quantize(model.downscale(hr))
        checks = ((results[0], "lr", lr, sr_ref), (results[1], "hr", hr, down_ref))
        for entry, name, x, ref in checks:
            entry.max_abs_error, entry.mismatch = _compare(entry.path, name, x, ref)
            entry.checked_shape = tuple(ref.shape)
    return results
