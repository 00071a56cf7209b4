"""carcli: learned image downscaling and upscaling with the Content Adaptive Resampler.

>>> import carcli
>>> small = carcli.downscale(image, scale=4)          # PIL image, numpy array or tensor
>>> restored = carcli.upscale(small, scale=4)
>>> restored = carcli.roundtrip(image, scale=4)       # both steps in memory
>>> carcli.save(small, "small.png")                   # PNG that remembers the original size

Module map (one job each; docs/architecture.md says more)::

    Command line (no torch until a command runs)
      `cli`                   the `car` command: options -> a task for the batch runner -> exit code
      `__main__`              `python -m carcli` runs `car`
      `console`               what the user sees: progress, error lines (`user_errors`), tables
      `defaults`              defaults `--help` shows, free of heavy imports
      `formats`               file names, formats and PNG notes: image I/O that needs no decoder
      `paths`                 INPUT files, and OUTPUT checked against INPUT
      `report`                the `--json` report schema of downscale, upscale and roundtrip
      `errors`                every error a user can cause and its exit code
      `interrupts`            SIGTERM/SIGHUP end a run as Ctrl-C does (exit 128 + N)
      `info`                  what `car info` reports: versions, devices, backends, weights

    Library: running the networks
      `api`                   the one-call API: `carcli.downscale`, `upscale`, `roundtrip`
      `runpolicy`             `RunPolicy`: device, precision, threads, memory budget
      `engine`                `Processor` (a model on tensors); `build_processor`, the factory
      `tiler`                 any image size in bounded memory: tiles with margins, OOM retries
      `pictures`              a processor on a `Picture`: alpha, bit depth, source-size note
      `batch`                 the runner: load -> compute -> save per file, errors per file
      `tasks`                 the three commands' work per file (downscale, upscale, round trip)
      `evaluation`            the round trip as a measurement: `--json` means, `evaluate_folder`
      `refine`                encoder-side refinement of the LR image against the SR network
      `streaming`             background decode and encode around the compute loop, in order
      `imageio`               reading, writing, finding images (bit depth, alpha, ICC, atomic)
      `metrics`               Y-PSNR and SSIM as the literature measures them, in bands
      `resize`                MATLAB-compatible bicubic, and the bicubic round-trip baseline
      `compare`               side-by-side comparison images for `car roundtrip --compare`
      `checkpoints`           finding, saving and loading weights (carcli's and the authors')
      `bundled`               files inside the package: shipped weights and sample photos
      `export_onnx`           both networks as ONNX graphs
      `pipeline`, `tiling`    former homes of the above, kept as re-exports for old imports

    Networks (`models`) and the op (`ops`)
      `models.car`            `CARModel`: resampler + op + 8-bit rounding + SR; its margin
      `models.config`         network configurations and presets; `check_scale`
      `models.resampler`      the kernel-generation network, float32 kernel head, reach
      `models.graft`          a trained two-branch resampler onto the cheaper shared head
      `models.sr`             `SRNetwork` (what an SR network offers) and `register_sr`
      `models.edsr`           EDSR, registered as "edsr": its two stages, float32 ends and margins
      `models.rep`            a re-parameterisable plain SR network, registered as "rep"
      `models.layers`         building blocks laid out like the authors' files
      `models.precision`      mixed precision: one autocast helper for inference and training
      `models.quantize`       every quantiser: 8-bit LR, N-bit outputs, the training gradient
      `ops.resample`          the op's front: picks a backend
      `ops.reference`         the op in plain PyTorch, written to be read; the yardstick
      `ops.torch_fast`        the pure-PyTorch op `car` runs: fused grid, in place; fixed taps
      `ops.native`            the op's C++/CUDA backend, built on first use (`ops/csrc`)

    Training (`train`: never imports the inference internals above)
      `train.commands`        `car train`, `export`, `average`: collect options, report errors
      `train.config`          `TrainConfig`: the one set of defaults, checks and resume rules
      `train.trainer`         the loop: joint optimisation, EMA, validation, resumable state
      `train.data`            training patches: images decoded once, random augmented crops
      `train.losses`          the regularisers on kernels and offsets
      `train.progress`        what `car train` shows while it runs
      `train.ddp`             many processes under torchrun (DistributedDataParallel)
      `train.distill`         cached distillation targets; bicubic LR for the generic upscaler
      `train.export`          a run -> the inference checkpoint `car` loads, with CPU timing
      `train.average`         weight averaging of checkpoints (a model soup)
      `train.__main__`        `python -m carcli.train`

    Beyond one process (`distributed`)
      `distributed.commands`  `car batch`: the local commands on a Ray cluster
      `distributed.ray_batch` its engine: the same tasks in a pool of Ray actors
"""

from __future__ import annotations

import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any


# Large CPU tensors on transparent huge pages. Each layer's output on a large tile is a fresh
# block of tens of MB, which the C library maps from the kernel 4 KB page by page: on a
# 2-core CPU the EDSR body ran at 5.3 us per LR pixel on a 700 x 700 tile and at 3.0 with
# huge pages (2.6 on 256 x 256 tiles); a 2 MP photo's 2x upscale took 1.7 s instead of 2.8. PyTorch
# reads the variable once, at its first allocation, hence here, before carcli imports torch.
# A value the user set wins (THP_MEM_ALLOC_ENABLE=0 turns it off). Only where the kernel
# offers huge pages: elsewhere PyTorch's request fails and it would print a warning.
def _kernel_offers_huge_pages() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


if _kernel_offers_huge_pages():
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:
    __version__ = version("carcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "downscale", "load_model", "roundtrip", "save", "upscale"]

# The API is imported on first use (PEP 562), so that `car --help` and the other
# pure command-line paths do not pay for importing torch.
_LAZY = {
    "load_model": "carcli.checkpoints",
    "downscale": "carcli.api",
    "roundtrip": "carcli.api",
    "upscale": "carcli.api",
    "save": "carcli.imageio",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'carcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
