"""The ``car`` command: a thin Typer layer over the batch runner and its tasks.

Each command checks its arguments, loads the model, hands a task to
``run_batch`` and turns the outcome into an exit code: 0 when every image
succeeded, 1 when some failed, 2 for usage errors (bad options, OUTPUT equal
to INPUT, no weights), 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from carcli import __version__
from carcli.console import stderr_console
from carcli.defaults import REFINE_MAX_CHANGE
from carcli.train import commands as train_commands

# The modules behind the commands import torch (seconds), so they are imported in
# the command bodies: `car --help` and usage errors answer without them.
if TYPE_CHECKING:
    from carcli.batch import Outcome, Task
    from carcli.engine import Processor

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
LOSSY_REFUSED = (
    "refusing to write the downscaled images with lossy {fmt}: CAR hides detail in the exact "
    "8-bit values that the SR network reads back, and lossy compression destroys it (worse "
    "than for a bicubic image). Use --format png or webp (lossless), or pass --allow-lossy"
)

app = typer.Typer(
    name="car",
    help=(
        "Learned image downscaling and upscaling with the Content Adaptive Resampler (CAR). "
        "An H x W image downscales to ceil(H/s) x ceil(W/s); upscaling restores the exact "
        "original size when the PNG came from `car downscale`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Scale(str, Enum):
    x2 = "2"
    x4 = "4"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LRFormat(str, Enum):
    png = "png"
    webp = "webp"
    jpg = "jpg"


# ---------------------------------------------------------------- shared options

ScaleOpt = Annotated[Scale, typer.Option("--scale", "-s", help="Scale factor.")]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help=(
            "A carcli .safetensors checkpoint, a folder holding car_x2/car_x4.safetensors, or "
            "the authors' folder with kgn.pth and usn.pth (or its 2x/ and 4x/ subfolders). "
            "Default: the weights installed with carcli (see `car info`)."
        ),
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", "-d", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."
    ),
]
RecursiveOpt = Annotated[
    bool,
    typer.Option(
        "--recursive", "-r", help="Descend into subfolders; outputs mirror the relative paths."
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace existing outputs. Without it they are skipped, so a batch can be resumed.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress bar, notes, table or summary; errors still print."
    ),
]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Also write a JSON report to FILE.", metavar="FILE"),
]
TileOpt = Annotated[
    int | None,
    typer.Option(
        "--tile",
        min=8,
        help=(
            "Tile side in output pixels (LR pixels for downscale, HR for upscale and "
            "roundtrip). Large images run tile by tile with overlapping margins, so the "
            "result matches the untiled one. Default: sized from free memory (RAM on the "
            "CPU, at most 1 GiB per image; free GPU memory on CUDA, with smaller tiles "
            "tried after an out-of-memory error)."
        ),
        show_default=False,
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help=(
            "Network arithmetic: fp32, bf16, or fp16 (CUDA only); auto: fp16 on CUDA, bf16 on "
            "CPUs with native bfloat16 (AVX512-BF16/AMX), else fp32. The resampling op and "
            "the last conv always run in float32 (see README, Performance)."
        ),
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help=(
            "CPU threads for the networks. Default: the cores not busy with other processes "
            "(sampled for 0.1 s at start), at least 1; OMP_NUM_THREADS overrides it."
        ),
        show_default=False,
    ),
]
RefineOpt = Annotated[
    int,
    typer.Option(
        "--refine",
        min=0,
        help=(
            "Tune each downscaled image for N more steps against the upscaler (gradient "
            "descent through the 8-bit rounding): much better reconstructions (Set5 at 4x: "
            "32.59 -> 34.14 dB with 20 steps) at a large cost (each step is a forward and "
            "backward pass of the upscaler; see README, Refinement). 0: off."
        ),
    ),
]
RefineRangeOpt = Annotated[
    int,
    typer.Option(
        "--refine-range",
        min=0,
        max=255,
        help="With --refine: how many 8-bit levels a pixel may move from the resampler's value.",
    ),
]
InputArg = Annotated[
    Path,
    typer.Argument(
        exists=True,
        help="An image file or a folder of images (PNG, JPEG, WebP, BMP, TIFF).",
        show_default=False,
    ),
]
QualityOpt = Annotated[
    int, typer.Option("--quality", min=1, max=100, help="JPEG quality (only with --format jpg).")
]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line and an exit code, never a traceback."""
    from carcli.checkpoints import WeightsError
    from carcli.errors import UsageError

    err = stderr_console()
    try:
        yield
    except (UsageError, WeightsError) as exc:
        err.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print(
            "interrupted: finished outputs are complete; run the same command again to resume "
            "(existing outputs are skipped)",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _processor(
    weights: Path | None,
    scale: Scale,
    device: str,
    precision: Precision = Precision.auto,
    tile: int | None = None,
    threads: int | None = None,
    refine: int = 0,
    refine_range: int = REFINE_MAX_CHANGE,
) -> Processor:
    """The model on its device, tuned: channels-last, the precision, tiles, threads."""
    from carcli.checkpoints import load_model
    from carcli.engine import Processor
    from carcli.runpolicy import resolve_device, set_cpu_threads

    dev = resolve_device(device)
    if threads is not None or dev.type == "cpu":
        set_cpu_threads(threads)
    model, _ = load_model(weights, int(scale.value), dev)
    return Processor(
        model,
        dev,
        precision.value,
        tile=tile,
        channels_last=True,
        refine=refine,
        refine_max_change=refine_range,
    )


def _run(task: Task, source: Path, recursive: bool, quiet: bool) -> list[Outcome]:
    from carcli.batch import make_items, run_batch
    from carcli.console import ConsoleReporter
    from carcli.errors import UsageError
    from carcli.imageio import IMAGE_SUFFIXES
    from carcli.paths import collect_inputs

    inputs = collect_inputs(source, recursive)
    if not inputs:
        kinds = " ".join(sorted(IMAGE_SUFFIXES))
        hint = "" if recursive else "; add --recursive to look in subfolders"
        raise UsageError(f"no images found in {source} (looked for {kinds}){hint}")
    return run_batch(task, make_items(task, inputs), ConsoleReporter(quiet=quiet))


def _write_json(path: Path | None, data: dict[str, Any]) -> bool:
    if path is None:
        return True
    from carcli.imageio import ImageWriteError, atomic_write_bytes

    text = json.dumps(data, indent=2, default=str) + "\n"
    try:
        atomic_write_bytes(path, text.encode())
    except ImageWriteError as exc:
        stderr_console().print(f"error: --json: {exc}", style="red", markup=False, soft_wrap=True)
        return False
    return True


def _batch_json(command: str, scale: Scale, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "command": command,
        "scale": int(scale.value),
        "count": sum(o.status == "ok" for o in outcomes),
        "failed": [
            {"file": o.item.rel, "error": o.error} for o in outcomes if o.status == "failed"
        ],
        "skipped": [o.item.rel for o in outcomes if o.status == "skipped"],
        "images": [o.record for o in outcomes if o.status == "ok"],
    }


def _exit(outcomes: Sequence[Outcome], json_ok: bool = True) -> None:
    failed = any(o.status == "failed" for o in outcomes) or not json_ok
    raise typer.Exit(1 if failed else 0)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"carcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Learned image downscaling and upscaling with the Content Adaptive Resampler (CAR)."""


# ---------------------------------------------------------------- commands


@app.command()
def downscale(
    input: InputArg,
    output: Annotated[
        Path,
        typer.Argument(
            help=(
                "Output folder (mirrors INPUT's relative paths), or an output file name when "
                "INPUT is one file."
            ),
            show_default=False,
        ),
    ],
    scale: ScaleOpt = Scale.x4,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    fmt: Annotated[
        LRFormat | None,
        typer.Option(
            "--format",
            "-f",
            help="png (default), webp (lossless) or jpg (lossy: needs --allow-lossy).",
            show_default=False,
        ),
    ] = None,
    allow_lossy: Annotated[
        bool,
        typer.Option(
            "--allow-lossy", help="Permit --format jpg, knowing it ruins the reconstruction."
        ),
    ] = False,
    quality: QualityOpt = 95,
    refine: RefineOpt = 0,
    refine_range: RefineRangeOpt = REFINE_MAX_CHANGE,
    tile: TileOpt = None,
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    json_file: JsonOpt = None,
) -> None:
    """Downscale with CAR: H x W becomes ceil(H/s) x ceil(W/s), an 8-bit image.

    The result is written losslessly (PNG by default). The PNG records the
    original size and scale in text chunks (carcli:source-size, carcli:scale),
    so `car upscale` restores exactly the original size. 16-bit inputs are
    read at full precision; the downscaled image is 8-bit by design. Alpha is
    resized with bicubic and kept (RGBA PNG).
    """
    from carcli.errors import UsageError
    from carcli.imageio import FORMATS
    from carcli.paths import check_paths, output_target
    from carcli.tasks import DownscaleTask

    with _user_errors():
        check_paths(input, output, recursive)
        out_dir, out_file, fmt_name = output_target(input, output, fmt.value if fmt else None)
        if not FORMATS[fmt_name][1] and not allow_lossy:
            raise UsageError(LOSSY_REFUSED.format(fmt=fmt_name.upper()))
        processor = _processor(
            weights, scale, device, precision, tile, threads, refine, refine_range
        )
        task = DownscaleTask(processor, out_dir, out_file, fmt_name, quality, overwrite)
        outcomes = _run(task, input, recursive, quiet)
    _exit(outcomes, _write_json(json_file, _batch_json("downscale", scale, outcomes)))


@app.command()
def upscale(
    input: InputArg,
    output: Annotated[
        Path,
        typer.Argument(
            help=(
                "Output folder (mirrors INPUT's relative paths), or an output file name when "
                "INPUT is one file."
            ),
            show_default=False,
        ),
    ],
    scale: ScaleOpt = Scale.x4,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    fmt: Annotated[
        LRFormat | None,
        typer.Option(
            "--format", "-f", help="png (default), webp (lossless) or jpg.", show_default=False
        ),
    ] = None,
    quality: QualityOpt = 95,
    tile: TileOpt = None,
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    json_file: JsonOpt = None,
) -> None:
    """Reconstruct full-size images from CAR-downscaled ones.

    When the PNG came from `car downscale` (text chunk carcli:source-size), the
    output has exactly the original size; otherwise it is s*h x s*w. 16-bit
    inputs give 16-bit PNGs. Use the same --scale and weights as for
    downscaling: the SR network only understands its own resampler's images.
    """
    from carcli.paths import check_paths, output_target
    from carcli.tasks import UpscaleTask

    with _user_errors():
        check_paths(input, output, recursive)
        out_dir, out_file, fmt_name = output_target(input, output, fmt.value if fmt else None)
        processor = _processor(weights, scale, device, precision, tile, threads)
        task = UpscaleTask(processor, out_dir, out_file, fmt_name, quality, overwrite)
        outcomes = _run(task, input, recursive, quiet)
    _exit(outcomes, _write_json(json_file, _batch_json("upscale", scale, outcomes)))


@app.command()
def roundtrip(
    input: Annotated[
        Path | None,
        typer.Argument(
            exists=True,
            help="An image or a folder of images. Default: the bundled samples/ folder.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Also write OUTPUT/lr/NAME.png (8-bit LR) and OUTPUT/sr/NAME.png (result).",
            show_default=False,
        ),
    ] = None,
    scale: ScaleOpt = Scale.x4,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help=(
                "With --output: also write OUTPUT/compare/NAME.png, original | bicubic | CAR "
                "side by side with a magnified detail crop of each."
            ),
        ),
    ] = False,
    refine: RefineOpt = 0,
    refine_range: RefineRangeOpt = REFINE_MAX_CHANGE,
    tile: TileOpt = None,
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    json_file: JsonOpt = None,
) -> None:
    """Downscale, quantise to 8 bits and upscale in memory; measure against the input.

    Prints Y-PSNR and SSIM per image next to a bicubic baseline (MATLAB-style
    imresize down and up at the same scale), with a mean row. Metrics: BT.601
    luma, `scale` pixels shaved from each border, PSNR peak 255, SSIM with an
    11x11 Gaussian window (sigma 1.5). The result equals `car downscale` to PNG
    followed by `car upscale`.
    """
    from carcli.console import roundtrip_table, stdout_console
    from carcli.errors import UsageError
    from carcli.evaluation import roundtrip_report
    from carcli.paths import check_paths
    from carcli.tasks import RoundtripTask

    with _user_errors():
        if input is None:
            if not SAMPLES_DIR.is_dir():
                raise UsageError(
                    f"no INPUT given and the bundled samples folder {SAMPLES_DIR} is missing"
                )
            input = SAMPLES_DIR
        if compare and output is None:
            raise UsageError("--compare writes images, so it needs --output DIR")
        if output is not None:
            check_paths(input, output, recursive)
            if output.exists() and not output.is_dir():
                raise UsageError(f"--output must be a folder, but {output} is a file")
        processor = _processor(
            weights, scale, device, precision, tile, threads, refine, refine_range
        )
        if tile is not None:  # --tile counts HR pixels here: the image this command returns
            processor.down_tile = max(1, tile // processor.scale)
        task = RoundtripTask(processor, output, compare=compare, overwrite=overwrite)
        outcomes = _run(task, input, recursive, quiet)
    report = roundtrip_report(outcomes, int(scale.value))
    if refine:
        report["refine"] = {"steps": refine, "range": refine_range}
    if not quiet and report["count"]:
        records = [o.record for o in outcomes if o.status == "ok"]
        stdout_console().print(roundtrip_table(records, report))
    json_ok = _write_json(json_file, report)
    if task.kept and not quiet:
        stderr_console().print(
            f"note: kept {task.kept} existing output file(s) in {output} (--overwrite replaces)",
            style="cyan",
            markup=False,
            highlight=False,
        )
    _exit(outcomes, json_ok)


@app.command()
def info(json_file: JsonOpt = None) -> None:
    """Versions, devices and their resampling backend, installed weights and where they live."""
    from carcli.console import info_tables, stdout_console
    from carcli.info import gather

    data = gather()
    console = stdout_console()
    for renderable in info_tables(data):
        console.print(renderable)
    if not _write_json(json_file, data):
        raise typer.Exit(1)


# Training has its own package; `car train`, `car export` and `car average` are its entry points.
app.command("train")(train_commands.train)
app.command("export")(train_commands.export)
app.command("average")(train_commands.average)


def main() -> None:
    """Console-script entry point (``car``)."""
    app()
