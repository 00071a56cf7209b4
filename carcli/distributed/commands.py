"""``car batch ACTION INPUT [OUTPUT]``: car downscale / upscale / roundtrip on a Ray cluster.

The options, checks, outputs, exit codes and ``--json`` reports are the local
commands'; only the engine differs (:mod:`carcli.distributed.ray_batch`).
INPUT and OUTPUT may be local paths or filesystem URIs (``s3://bucket/photos``).
Import :mod:`carcli.cli` rather than this module first: it registers the command.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# The local commands' option types and helpers (carcli.cli registers this command at its end).
from carcli.cli import (
    LOSSY_REFUSED,
    DeviceOpt,
    JsonOpt,
    LRFormat,
    OverwriteOpt,
    Precision,
    PrecisionOpt,
    QualityOpt,
    QuietOpt,
    RecursiveOpt,
    RefineOpt,
    RefineRangeOpt,
    Scale,
    SuffixOpt,
    TileOpt,
    WeightsOpt,
    _check_suffix,
    _exit,
    _upscale_groups,
    _user_errors,
    _warn_foreign,
    _write_json,
)
from carcli.defaults import REFINE_MAX_CHANGE


class Action(str, Enum):
    downscale = "downscale"
    upscale = "upscale"
    roundtrip = "roundtrip"


def batch(
    action: Annotated[Action, typer.Argument(help="downscale, upscale or roundtrip.")],
    input: Annotated[
        str,
        typer.Argument(
            help="An image, a folder, or a URI pyarrow reads (s3://, gs://, hdfs://, file://).",
            show_default=False,
        ),
    ],
    output: Annotated[
        str | None,
        typer.Argument(
            help=(
                "Output folder or URI (a file name for one input file). roundtrip: optional; "
                "writes OUTPUT/lr/ and OUTPUT/sr/ as its --output does."
            ),
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            "--address",
            help=(
                "Ray cluster: auto (the running one), ray://HOST:10001, or local (a new "
                "instance on this machine). Default: $RAY_ADDRESS, else a new local instance."
            ),
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Actors, each loading its models once. Default: one per GPU in the cluster, else "
            "one per --threads CPUs.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Files per actor call (the retry unit).")
    ] = 8,
    scale: Annotated[
        Scale | None,
        typer.Option(
            "--scale",
            "-s",
            help=(
                "Scale factor. Default: 4; upscale: the one `car downscale` recorded in each "
                "PNG (carcli:scale), else 4."
            ),
            show_default=False,
        ),
    ] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    suffix: SuffixOpt = "",
    fmt: Annotated[
        LRFormat | None,
        typer.Option(
            "--format",
            "-f",
            help="downscale/upscale: png (default), webp or jpg.",
            show_default=False,
        ),
    ] = None,
    allow_lossy: Annotated[
        bool, typer.Option("--allow-lossy", help="Permit downscaling to --format jpg.")
    ] = False,
    quality: QualityOpt = 95,
    compare: Annotated[
        bool, typer.Option("--compare", help="roundtrip: also write OUTPUT/compare/ panels.")
    ] = False,
    refine: RefineOpt = 0,
    refine_range: RefineRangeOpt = REFINE_MAX_CHANGE,
    tile: TileOpt = None,
    precision: PrecisionOpt = Precision.auto,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads per actor (default 1 on CPUs).",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_file: JsonOpt = None,
) -> None:
    """Run downscale, upscale or roundtrip on a Ray cluster (needs Ray: the ray extra).

    Same outputs and reports as the local commands, file for file; a pool of
    actors loads each model once (one GPU each when the cluster has GPUs). upscale
    picks the scale and model per file as `car upscale` does: the generic upscaler
    for images without a carcli note, when installed. A failed job resumes when
    run again: finished outputs are skipped.
    """
    import time

    from carcli.console import ConsoleReporter, roundtrip_table, stdout_console
    from carcli.distributed.ray_batch import Engine, is_uri, require_ray, run_on_ray
    from carcli.errors import UsageError
    from carcli.evaluation import roundtrip_report
    from carcli.formats import FORMATS

    started = time.perf_counter()
    with _user_errors():
        require_ray()
        _check_suffix(suffix)
        spec = _spec(action.value, input, output, fmt.value if fmt else None, recursive)
        if spec.action == "downscale" and not FORMATS[spec.fmt][1] and not allow_lossy:
            raise UsageError(LOSSY_REFUSED.format(fmt=spec.fmt.upper()))
        if compare and (spec.action != "roundtrip" or output is None):
            raise UsageError("--compare is for roundtrip with an OUTPUT folder")
        default = None if spec.action == "upscale" else 4  # upscale: each file's note, else 4
        spec.scale = int(scale.value) if scale is not None else default
        spec.weights, spec.device = weights and str(weights), device
        spec.precision, spec.tile, spec.threads = precision.value, tile, threads
        spec.refine, spec.refine_range, spec.quality = refine, refine_range, quality
        spec.compare, spec.overwrite, spec.suffix = compare, overwrite, suffix
        local_notes = spec.action == "upscale" and not is_uri(input)
        if local_notes:  # read here as `car upscale` does; remote notes: the actors tell
            _warn_foreign_local(spec, weights, recursive)
        engine = Engine()
        reporter = ConsoleReporter(quiet=quiet)
        outcomes = run_on_ray(spec, reporter, recursive, address, workers, batch_size, engine)
    if spec.action == "upscale" and not local_notes and engine.foreign:
        _warn_foreign(engine.foreign, engine.images)
    extra: dict = {}
    means: dict = {}
    if spec.action == "roundtrip":
        means = roundtrip_report(outcomes, spec.scale)
        extra = {k: means[k] for k in ("psnr", "ssim", "baselines") if k in means}
        if refine:
            extra["refine"] = {"steps": refine, "range": refine_range}
    report = _report(spec, input, output, engine, outcomes, time.perf_counter() - started, extra)
    if spec.action == "roundtrip" and not quiet and report["count"]:
        records = [o.record for o in outcomes if o.status == "ok"]
        stdout_console().print(roundtrip_table(records, means))
    _exit(outcomes, _write_json(json_file, report))


def _warn_foreign_local(spec, weights: Path | None, recursive: bool) -> None:  # noqa: ANN001
    """`car upscale`'s warning for local inputs without a carcli note, before the job."""
    from carcli.distributed.ray_batch import Store

    inputs = Store(spec.source).list_images(recursive)
    _, foreign = _upscale_groups(inputs, spec.scale, weights)
    if foreign:
        _warn_foreign(foreign, len(inputs))


def _report(spec, input: str, output: str | None, engine, outcomes, seconds: float, extra: dict):  # noqa: ANN001, ANN202
    """The local commands' ``--json`` report (carcli-report/1), with the actors' engine.

    ``scale`` is the models' one scale (None when an upscale ran several), as locally.
    """
    from carcli.report import RunInfo, build_report

    scales = {info.scale for info in engine.models} or {spec.scale}
    run = RunInfo(
        command=spec.action,
        input=input,
        output=output,
        device=engine.device,
        precision=engine.precision,
        models=list(engine.models),
        scale=scales.pop() if len(scales) == 1 else None,
        seconds=seconds,
    )
    return build_report(run, outcomes, extra)


def _spec(action: str, source: str, output: str | None, fmt: str | None, recursive: bool):  # noqa: ANN202
    """The job's inputs and outputs, checked as the local commands check them."""
    from carcli.distributed.ray_batch import JobSpec, is_uri
    from carcli.errors import UsageError
    from carcli.paths import check_paths, output_target

    if output is None and action != "roundtrip":
        raise UsageError(f"{action} needs an OUTPUT folder or URI")
    spec = JobSpec(action, source, output, fmt=fmt or "png")
    if is_uri(source) or (output is not None and is_uri(output)):
        if output is not None and output.rstrip("/") == source.rstrip("/"):
            raise UsageError(
                "OUTPUT is the same as INPUT; choose another OUTPUT (inputs are never overwritten)"
            )
        return spec
    src = Path(source)
    if not src.exists():
        raise UsageError(f"{source}: no such file or folder")
    if output is None:
        return spec
    check_paths(src, Path(output), recursive)
    if action == "roundtrip":
        if Path(output).exists() and not Path(output).is_dir():
            raise UsageError(f"OUTPUT must be a folder for roundtrip, but {output} is a file")
        return spec
    out_dir, out_file, spec.fmt = output_target(src, Path(output), fmt)
    if out_file is not None:
        spec.output, spec.out_file = None, str(out_file)
    return spec
