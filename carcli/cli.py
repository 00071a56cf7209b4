"""The ``car`` command: a thin Typer layer over the batch runner and its tasks.

Each command checks its arguments, loads the model, hands a task to
``run_batch`` and turns the outcome into an exit code: 0 when every image
succeeded, 1 when some failed, 2 for usage errors (bad options, OUTPUT equal
to INPUT, no weights), 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
import typer.main

from carcli import __version__
from carcli.bundled import samples_path
from carcli.console import printable, stderr_console, user_errors
from carcli.defaults import REFINE_MAX_CHANGE
from carcli.errors import EXIT_FAILED, EXIT_OK
from carcli.train import commands as train_commands

# The modules behind the commands import torch (seconds), so they are imported in
# the command bodies: `car --help` and usage errors answer without them.
if TYPE_CHECKING:
    from carcli.batch import Outcome, Task
    from carcli.engine import Processor
    from carcli.report import ModelInfo

SAMPLES_DIR = samples_path()
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
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
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
UpscaleScaleOpt = Annotated[
    Scale | None,
    typer.Option(
        "--scale",
        "-s",
        help=(
            "Scale factor. Default: the one `car downscale` recorded in each PNG "
            "(carcli:scale), else 4."
        ),
        show_default=False,
    ),
]
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
    typer.Option(
        "--json",
        help=(
            "Also write a JSON report to FILE (- for standard output): every image, the "
            "failed and skipped ones, the weights and their SHA-256, device and precision "
            "(docs/report-schema.md)."
        ),
        metavar="FILE",
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="OUTPUT as an option (the same as giving it as the second argument).",
        show_default=False,
    ),
]
OutputArg = Annotated[
    Path | None,
    typer.Argument(
        help=(
            "Output folder (mirrors INPUT's relative paths), or an output file name when "
            "INPUT is one file; - writes the image to standard output. Or use -o/--output."
        ),
        show_default=False,
    ),
]
SuffixOpt = Annotated[
    str,
    typer.Option(
        "--suffix",
        help=(
            "Text added to each output name before its extension, as Real-ESRGAN's --suffix "
            "(photo.jpg -> photo_x4.png with --suffix _x4). {ext} stands for the input's "
            "extension, so x.png and x.jpg in one folder get distinct outputs (--suffix _{ext})."
        ),
    ),
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
            "the last conv always run in float32 (see docs/performance.md)."
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
            "backward pass of the upscaler; see docs/results.md, Refinement). 0: off."
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
        help=(
            "An image file or a folder of images (PNG, JPEG, WebP, BMP, TIFF, AVIF; HEIC with "
            "the 'heif' extra); - reads one image from standard input."
        ),
        show_default=False,
    ),
]
QualityOpt = Annotated[
    int, typer.Option("--quality", min=1, max=100, help="JPEG quality (only with --format jpg).")
]


INTERRUPTED = (
    "interrupted: finished outputs are complete; run the same command again to resume "
    "(existing outputs are skipped)"
)


def _user_errors() -> contextlib.AbstractContextManager:
    """Usage errors and failures as one line and an exit code; Ctrl-C as 130."""
    return user_errors(INTERRUPTED)


def _processor(
    weights: Path | None,
    scale: int,
    device: str,
    precision: Precision = Precision.auto,
    tile: int | None = None,
    threads: int | None = None,
    refine: int = 0,
    refine_range: int = REFINE_MAX_CHANGE,
    generic: Path | None = None,
    upscale_only: bool = False,
) -> tuple[Processor, ModelInfo]:
    """The model on its device, run as :class:`carcli.runpolicy.RunPolicy` says (as the API).

    ``generic``: load this generic upscaler (SR only) instead of the pair;
    ``upscale_only``: ``weights`` may be one too (it is refused for a downscale).
    """
    from carcli.checkpoints import load_for_run
    from carcli.engine import build_processor
    from carcli.runpolicy import RunPolicy, resolve_device

    policy = RunPolicy(device, precision.value, tile, "auto" if threads is None else threads)
    dev = resolve_device(policy.device)
    model, info = load_for_run(weights, scale, dev, generic, upscale_only)
    return build_processor(model, policy, refine, refine_range), info


def _inputs(source: Path, recursive: bool) -> list[tuple[Path, Path]]:
    """INPUT's images (file, relative path); a usage error when there are none."""
    from carcli.errors import UsageError
    from carcli.formats import IMAGE_SUFFIXES
    from carcli.paths import check_input, collect_inputs

    check_input(source)
    inputs = collect_inputs(source, recursive)
    if not inputs:
        kinds = " ".join(sorted(IMAGE_SUFFIXES))
        hint = "" if recursive else "; add --recursive to look in subfolders"
        raise UsageError(f"no images found in {source} (looked for {kinds}){hint}")
    return inputs


def _check_weights(weights: Path | None) -> None:
    """A --weights path that does not exist is a usage error found before loading torch."""
    from carcli.errors import UsageError

    if weights is not None and not weights.expanduser().exists():
        raise UsageError(f"weights path {weights.expanduser()} does not exist")


def _output(positional: Path | None, option: Path | None) -> Path:
    """OUTPUT from the argument or -o/--output (one of them, or both equal)."""
    from carcli.errors import UsageError

    if positional is not None and option is not None and positional != option:
        raise UsageError(f"OUTPUT given twice ({positional} and -o {option}); give it once")
    output = positional if positional is not None else option
    if output is None:
        raise UsageError(
            "missing OUTPUT: give it as the second argument or with -o/--output "
            "(- for standard output)"
        )
    return output


def _check_suffix(suffix: str) -> None:
    from carcli.errors import UsageError

    if "/" in suffix or "\\" in suffix or suffix in (".", ".."):
        raise UsageError(f"--suffix {suffix!r} must not contain a path separator")


def _check_collisions(inputs: Sequence[tuple[Path, Path]], outputs: Any, suffix: str) -> None:
    """Refuse a run where two inputs would write the same output (x.png and x.jpg -> x.png).

    ``outputs(rel)`` gives an input's output paths. Checked before any model is
    loaded, so the mistake costs nothing; the batch would otherwise fail the
    second file only after the first was written.
    """
    import os

    from carcli.errors import UsageError
    from carcli.formats import is_stdio

    claimed: dict[str, str] = {}
    for _, rel in inputs:
        for path in outputs(rel):
            if is_stdio(path):
                continue
            key = os.path.normcase(os.path.abspath(path))
            if key in claimed and claimed[key] != rel.as_posix():
                hint = (
                    "rename one"
                    if "{ext}" in suffix
                    else "add --suffix '_{ext}' to keep the input's extension in output names, "
                    "or rename one"
                )
                raise UsageError(
                    f"{claimed[key]} and {rel.as_posix()} would both be written to {path}; {hint}"
                )
            claimed[key] = rel.as_posix()


def _run(task: Task, inputs: Sequence[tuple[Path, Path]], quiet: bool) -> list[Outcome]:
    from carcli.batch import make_items, run_batch
    from carcli.console import ConsoleReporter

    return run_batch(task, make_items(task, inputs), ConsoleReporter(quiet=quiet))


def _check_json(json_file: Path | None, output: Path | None) -> None:
    from carcli.errors import UsageError
    from carcli.formats import is_stdio

    if is_stdio(json_file) and is_stdio(output):
        raise UsageError("--json - and OUTPUT - would both write to standard output; pick one")
    if is_stdio(output) and _stdout_is_terminal():
        raise UsageError(
            "refusing to write image data to a terminal: redirect standard output "
            "(car ... - > out.png) or give an OUTPUT file"
        )


def _stdout_is_terminal() -> bool:
    import sys

    stream = getattr(sys.stdout, "buffer", sys.stdout)
    return bool(stream is not None and stream.isatty())


def _report(
    command: str,
    input: Path,
    output: Path | None,
    processors: Sequence[tuple[Processor, ModelInfo]],
    outcomes: Sequence[Outcome],
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from carcli.report import RunInfo, build_report

    scales = {info.scale for _, info in processors}
    first = processors[0][0] if processors else None
    run = RunInfo(
        command=command,
        input=str(input),
        output=None if output is None else str(output),
        device=str(first.device) if first else "none",
        precision=first.precision if first else "none",
        models=[info for _, info in processors],
        scale=scales.pop() if len(scales) == 1 else None,
        seconds=time.perf_counter() - started,
    )
    return build_report(run, outcomes, extra)


def _write_json(path: Path | None, data: dict[str, Any]) -> bool:
    """Write the report atomically; False (one error line, never a traceback) if it fails."""
    if path is None:
        return True
    from carcli.imageio import ImageWriteError, atomic_write_bytes
    from carcli.report import report_text

    text = report_text(data)
    try:
        atomic_write_bytes(path, text.encode())
    except (ImageWriteError, OSError) as exc:
        message = str(exc) if isinstance(exc, ImageWriteError) else exc.strerror or str(exc)
        stderr_console().print(
            f"error: --json: {printable(message)}",
            style="red",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return False
    return True


def _exit(outcomes: Sequence[Outcome], json_ok: bool = True) -> None:
    failed = any(o.status == "failed" for o in outcomes) or not json_ok
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


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
    output: OutputArg = None,
    output_opt: OutputOpt = None,
    suffix: SuffixOpt = "",
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
    original size and scale in text chunks (carcli:source-size, carcli:scale;
    XMP in WebP), so `car upscale` restores exactly the original size and
    scale. 16-bit inputs are read at full precision; the downscaled image is
    8-bit by design. Alpha is resized with bicubic and kept (RGBA PNG). An
    embedded colour profile (Display P3, Adobe RGB) is converted to sRGB, the
    networks' colour space, and outputs are sRGB (a note says so).
    """
    from carcli.errors import UsageError
    from carcli.formats import FORMATS

    started = time.perf_counter()
    with _user_errors():
        output = _output(output, output_opt)
        _check_weights(weights)
        out_dir, out_file, fmt_name, inputs = _writing_plan(
            input, output, fmt, suffix, recursive, json_file
        )
        if not FORMATS[fmt_name][1] and not allow_lossy:
            raise UsageError(LOSSY_REFUSED.format(fmt=fmt_name.upper()))
        from carcli.tasks import DownscaleTask

        processor, info = _processor(
            weights, int(scale.value), device, precision, tile, threads, refine, refine_range
        )
        task = DownscaleTask(
            processor, out_dir, out_file, fmt_name, quality, overwrite, suffix=suffix
        )
        outcomes = _run(task, inputs, quiet)
    report = _report("downscale", input, output, [(processor, info)], outcomes, started)
    _exit(outcomes, _write_json(json_file, report))


def _writing_plan(
    input: Path,
    output: Path,
    fmt: LRFormat | None,
    suffix: str,
    recursive: bool,
    json_file: Path | None,
) -> tuple[Path | None, Path | None, str, list[tuple[Path, Path]]]:
    """Everything downscale and upscale check before loading a model (no torch)."""
    from carcli.formats import FORMATS, output_name
    from carcli.paths import check_input, check_paths, check_report_target, output_target

    check_input(input)
    _check_suffix(suffix)
    _check_json(json_file, output)
    check_paths(input, output, recursive)
    out_dir, out_file, fmt_name = output_target(input, output, fmt.value if fmt else None)
    inputs = _inputs(input, recursive)
    extension = FORMATS[fmt_name][0]

    def outputs(rel: Path) -> list[Path]:
        if out_file is not None:
            return [out_file]
        assert out_dir is not None
        return [out_dir / output_name(rel, extension, suffix)]

    _check_collisions(inputs, outputs, suffix)
    check_report_target(
        json_file, [src for src, _ in inputs], [p for _, rel in inputs for p in outputs(rel)]
    )
    return out_dir, out_file, fmt_name, inputs


@app.command()
def upscale(
    input: InputArg,
    output: OutputArg = None,
    output_opt: OutputOpt = None,
    suffix: SuffixOpt = "",
    scale: UpscaleScaleOpt = None,
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

    When the PNG came from `car downscale` (text chunks carcli:source-size and
    carcli:scale), the output has exactly the original size and the recorded
    scale is used unless --scale is given; otherwise it is s*h x s*w. 16-bit
    inputs give 16-bit PNGs. The SR network only understands its own
    resampler's images: for other images (no carcli note) it can do worse than
    bicubic, which is said once per run, and the generic upscaler
    (car_generic_x2/x4.safetensors next to the weights) is used when installed.
    """
    started = time.perf_counter()
    with _user_errors():
        output = _output(output, output_opt)
        _check_weights(weights)
        out_dir, out_file, fmt_name, inputs = _writing_plan(
            input, output, fmt, suffix, recursive, json_file
        )
        chosen = None if scale is None else int(scale.value)
        runs, foreign = _upscale_groups(inputs, chosen, weights)
        if foreign:
            _warn_foreign(foreign, len(inputs))

        from carcli.tasks import UpscaleTask

        # One model per (scale, generic file or None); all loaded before any image is
        # written, so a bad checkpoint stops the run before it half-happens.
        order = {rel.as_posix(): i for i, (_, rel) in enumerate(inputs)}
        loaded = {
            key: _processor(
                weights, key[0], device, precision, tile, threads, generic=key[1], upscale_only=True
            )
            for key in runs
        }
        processors, outcomes = list(loaded.values()), []
        for key, members in runs.items():
            task = UpscaleTask(
                loaded[key][0], out_dir, out_file, fmt_name, quality, overwrite, suffix=suffix
            )
            outcomes += _run(task, members, quiet)
    outcomes.sort(key=lambda o: order.get(o.item.rel, 0))
    report = _report("upscale", input, output, processors, outcomes, started)
    _exit(outcomes, _write_json(json_file, report))


def _upscale_groups(
    inputs: Sequence[tuple[Path, Path]], scale: int | None, weights: Path | None
) -> tuple[dict[tuple[int, Path | None], list[tuple[Path, Path]]], list[tuple[int, Path | None]]]:
    """Inputs (in order) by the model that upscales them, and the model of each input that
    `car downscale` did not make.

    A model is (scale, generic upscaler or None for the pair), picked by
    :func:`carcli.checkpoints.upscaler_for` from each file's note alone (no decoding).
    """
    from carcli.checkpoints import upscaler_for
    from carcli.formats import made_by_car, read_note

    runs: dict[tuple[int, Path | None], list[tuple[Path, Path]]] = {}
    foreign: list[tuple[int, Path | None]] = []
    found: dict[int, Path | None] = {}
    for src, rel in inputs:
        note = read_note(src)
        key = upscaler_for(note, scale, weights, found)
        if not made_by_car(note):
            foreign.append(key)
        runs.setdefault(key, []).append((src, rel))
    return runs, foreign


def _warn_foreign(foreign: Sequence[tuple[int, Path | None]], total: int) -> None:
    """One line for the run: these images were not made by `car downscale`.

    ``foreign`` holds the model (scale, generic upscaler or None) of each such image.
    """
    count = len(foreign)
    which = "the input carries" if total == 1 else f"{count} of {total} images carry"
    scales = sorted({s for s, _ in foreign})
    generic = dict(foreign)
    found = [str(generic[s]) for s in scales if generic[s]]
    if found and len(found) == len(scales):
        action = f"using the generic upscaler {', '.join(found)} for them"
    else:
        action = (
            "results may be worse than bicubic (no generic upscaler "
            f"{'/'.join(f'car_generic_x{s}.safetensors' for s in scales)} is installed "
            "next to the weights)"
        )
    stderr_console().print(
        f"warning: {which} no carcli note (not made by `car downscale`): the CAR upscaler is "
        f"trained on its own downscaled images; {action}",
        style="yellow",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def roundtrip(
    input: Annotated[
        Path | None,
        typer.Argument(
            help=(
                "An image or a folder of images (- reads one from standard input). Default: "
                "the bundled samples/ folder."
            ),
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
    suffix: SuffixOpt = "",
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

    Prints Y-PSNR and SSIM per image next to a bicubic baseline (MATLAB's
    imresize down and up at the same scale, bit for bit on 8-bit images), with a
    mean row. Metrics: BT.601
    luma, `scale` pixels shaved from each border, PSNR peak 255, SSIM with an
    11x11 Gaussian window (sigma 1.5). The result equals `car downscale` to PNG
    followed by `car upscale`.
    """
    from carcli.console import roundtrip_table, stdout_console
    from carcli.errors import UsageError
    from carcli.formats import is_stdio, output_name
    from carcli.paths import check_input, check_paths, check_report_target

    started = time.perf_counter()
    with _user_errors():
        if input is None:
            if not SAMPLES_DIR.is_dir():
                raise UsageError(
                    f"no INPUT given and the bundled samples folder {SAMPLES_DIR} is missing"
                )
            input = SAMPLES_DIR
        check_input(input)
        _check_weights(weights)
        _check_suffix(suffix)
        if compare and output is None:
            raise UsageError("--compare writes images, so it needs --output DIR")
        if output is not None:
            if is_stdio(output):
                raise UsageError("--output is a folder (lr/, sr/), not standard output")
            check_paths(input, output, recursive)
            if output.exists() and not output.is_dir():
                raise UsageError(f"--output must be a folder, but {output} is a file")
        inputs = _inputs(input, recursive)
        roles = ("lr", "sr", "compare") if compare else ("lr", "sr")
        written = [
            output / role / output_name(rel, ".png", suffix)
            for _, rel in inputs
            for role in (roles if output is not None else ())
        ]
        check_report_target(json_file, [src for src, _ in inputs], written)
        if output is not None:
            _check_collisions(
                inputs, lambda rel: [output / "sr" / output_name(rel, ".png", suffix)], suffix
            )
        from carcli.evaluation import roundtrip_report
        from carcli.tasks import RoundtripTask

        processor, info = _processor(
            weights, int(scale.value), device, precision, tile, threads, refine, refine_range
        )
        if tile is not None:  # --tile counts HR pixels here: the image this command returns
            processor.down_tile = max(1, tile // processor.scale)
        task = RoundtripTask(processor, output, compare=compare, overwrite=overwrite, suffix=suffix)
        outcomes = _run(task, inputs, quiet)
    means = roundtrip_report(outcomes, int(scale.value))
    extra = {k: means[k] for k in ("psnr", "ssim", "baselines") if k in means}
    if refine:
        extra["refine"] = {"steps": refine, "range": refine_range}
    report = _report("roundtrip", input, output, [(processor, info)], outcomes, started, extra)
    if not quiet and report["count"] and not is_stdio(json_file):
        records = [o.record for o in outcomes if o.status == "ok"]
        stdout_console().print(roundtrip_table(records, means))
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
def info(json_file: JsonOpt = None, weights: WeightsOpt = None) -> None:
    """Versions, devices and their resampling backend, installed weights and where they live.

    With --weights: the checkpoints in that file or folder instead of the installed ones
    (configuration, architecture, parameters, recorded validation, SHA-256).
    """
    from carcli.console import info_tables, stdout_console
    from carcli.info import gather
    from carcli.paths import check_report_target

    with _user_errors():
        check_report_target(json_file, [], [])
        _check_weights(weights)
    data = gather(weights)
    console = stdout_console()
    for renderable in info_tables(data):
        console.print(renderable, soft_wrap=True)  # digests stay on one line each
    if not _write_json(json_file, data):
        raise typer.Exit(EXIT_FAILED)


@app.command("export-onnx")
def export_onnx(
    output: Annotated[
        Path,
        typer.Argument(help="Folder for car_xS_sr.onnx and car_xS_resampler_T.onnx."),
    ],
    scale: ScaleOpt = Scale.x4,
    weights: WeightsOpt = None,
    tile: Annotated[
        int,
        typer.Option(
            "--tile",
            help="Side T of the square HR tile the resampler graph takes (multiple of 8).",
        ),
    ] = 256,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write both networks as ONNX, checked against ONNX Runtime (needs the onnx extra).

    The SR network takes any N x 3 x H x W (float32 in [0, 1]) and returns the image
    at s times the size, unclamped. The resampler takes one 1 x 3 x T x T tile and
    returns its 8-bit-grid LR image (its sampling grid depends on the input size, so
    it is exported at a fixed size). See the docstring of carcli.export_onnx.
    """
    from carcli.errors import UsageError

    with _user_errors():
        from carcli import export_onnx as onnx_export

        s = int(scale.value)
        try:
            onnx_export.check_tile(tile, s)
        except onnx_export.OnnxExportError as exc:
            raise UsageError(str(exc)) from None
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: exists and is not a folder")
        existing = [p for p in onnx_export.output_paths(output, s, tile) if p.exists()]
        if existing and not overwrite:
            raise UsageError(f"{existing[0]}: exists (use --overwrite to replace it)")
        from carcli.checkpoints import file_digest, load_model, weights_files

        model, meta = load_model(weights, s, "cpu")
        files = weights_files(weights, s, meta)
        metadata = {
            "carcli_version": __version__,
            "weights": ", ".join(p.name for p in files),
            "weights_sha256": ", ".join(file_digest(p) for p in files if p.is_file()),
        }
        try:
            results = onnx_export.export_onnx(model, output, tile, metadata)
        except onnx_export.OnnxExportError as exc:
            raise UsageError(str(exc)) from None
    err = stderr_console()
    for entry in results:
        line = f"wrote {entry.path} ({entry.network}; input {entry.input_shape})"
        if entry.max_abs_error is not None:
            assert entry.mismatch is not None
            line += (
                f"; ONNX Runtime vs PyTorch on {entry.checked_shape}: max |diff| "
                f"{entry.max_abs_error:.2g}, {entry.mismatch:.3%} of samples > 1e-5 apart"
            )
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    if not onnx_export.onnxruntime_available():
        err.print(
            "note: onnxruntime is not installed, so the graphs were not checked "
            f"({onnx_export.EXTRA_HINT})",
            style="cyan",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# Training has its own package; `car train`, `car export` and `car average` are its entry points.
app.command("train")(train_commands.train)
app.command("export")(train_commands.export)
app.command("average")(train_commands.average)


def readable_help(command: Any) -> Any:
    """Give ``command`` (and its subcommands) the same help on every typer the range allows.

    Typer 0.27+ writes arguments in the usage line by their lower-case names in braces
    (``{input} {output}``) and 0.29 adds ``<bool>`` after on/off flags; with an explicit
    upper-case metavar for arguments and an empty one for flags, every version shows
    ``INPUT OUTPUT`` (0.27+: ``{INPUT} {OUTPUT}``) and bare flags, as the README does.
    """
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)
    for param in getattr(command, "params", ()):
        _readable_metavar(param)
    original = getattr(command, "get_help_option", None)
    if original is not None:  # --help is made per invocation, not kept in params

        def get_help_option(ctx: Any) -> Any:
            return _readable_metavar(original(ctx))

        command.get_help_option = get_help_option
    return command


def _readable_metavar(param: Any) -> Any:
    if param is None or param.metavar is not None:
        return param
    if isinstance(param, typer.core.TyperArgument) and param.name:
        param.metavar = param.name.upper()
    elif getattr(param, "is_flag", False):
        param.metavar = ""
    return param


def dash_names_hint(command: Any) -> Any:
    """Name the real mistake when a file name starting with ``-`` was read as an option.

    Click reports ``-x.png`` as "No such option: -x", which names the wrong
    thing; when the token is an existing path (or looks like an image file),
    the error says how to pass it instead.
    """
    for sub in getattr(command, "commands", {}).values():
        dash_names_hint(sub)
    original = command.parse_args

    def parse_args(ctx: Any, args: list[str]) -> Any:
        given = list(args)  # the parser consumes ``args`` as it goes
        try:
            return original(ctx, args)
        except Exception as exc:
            # click's or typer's own copy of it (typer 0.27+), whichever parsed the line
            if type(exc).__name__ != "NoSuchOption" or (token := _dash_file(given)) is None:
                raise
            usage_error = sys.modules[type(exc).__module__].UsageError
            raise usage_error(
                f"{token} starts with '-', so it was read as an option; to pass a file of "
                f"that name, put -- before it (car {ctx.info_name} [OPTIONS] -- {token} ...) "
                f"or write it as ./{token}",
                ctx,
            ) from None

    command.parse_args = parse_args
    return command


def _dash_file(args: Sequence[str]) -> str | None:
    """The first argument before ``--`` that starts with '-' and names a file (or looks so)."""
    import os

    from carcli.formats import IMAGE_SUFFIXES

    for arg in args:
        if arg == "--":
            return None
        dashed = len(arg) > 1 and arg.startswith("-") and "=" not in arg
        if dashed and (os.path.lexists(arg) or Path(arg).suffix.lower() in IMAGE_SUFFIXES):
            return arg
    return None


def main() -> None:
    """Console-script entry point (``car``)."""
    dash_names_hint(readable_help(typer.main.get_command(app)))()


# `car batch`: the commands above on a Ray cluster (carcli.distributed; needs carcli[ray]).
from carcli.distributed.commands import batch  # noqa: E402

app.command("batch")(batch)
