"""`car train` and `car export`: thin wrappers over :class:`carcli.train.trainer.Trainer`."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carcli.console import user_errors
from carcli.defaults import QUANT_GRADIENTS
from carcli.errors import EXIT_FAILED, EXIT_INTERRUPTED, ValidationError
from carcli.interrupts import SIGNALS
from carcli.train.config import TrainConfig

SCALE = 4  # the scale a new run trains for unless told
_D = TrainConfig  # the one set of training defaults (its fields' defaults)

# torch and the trainer are imported in the command bodies, so that `car --help`
# answers without them (see carcli.defaults).
if TYPE_CHECKING:
    import torch

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """'2h30m', '45m', '90s', '1.5h' or plain seconds -> seconds."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise typer.BadParameter(f"cannot read duration {text!r} (use e.g. 2h30m, 45m, 90s)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def make_evaluator(folders: list[Path], device: torch.device, generic: bool = False):  # noqa: ANN201
    """Validation through the same code path as `car roundtrip` (no files written).

    ``generic``: the SR network alone on bicubic LR images (a generic upscaler).
    """

    def evaluate(model) -> dict:  # noqa: ANN001
        from carcli.console import ConsoleReporter
        from carcli.evaluation import evaluate_folder
        from carcli.train.distill import evaluate_on_bicubic

        out = {}
        for folder in folders:
            if generic:
                out[folder.name] = evaluate_on_bicubic(model, folder, device)
                continue
            # quiet: no progress bar or notes, but a file that fails still gets its error line
            reporter = ConsoleReporter(quiet=True)
            report = evaluate_folder(
                model, folder, device=device, compare_bicubic=False, reporter=reporter
            )
            out[folder.name] = {"psnr": report["psnr"], "ssim": report["ssim"]}
        return out

    return evaluate


def _check_folders(run: Path, cfg: object) -> None:
    """Every path a run needs, checked before minutes of decoding and training.

    A missing --val folder used to surface only at the first validation, after
    all the training, and took the unsaved state down with it.
    """
    from carcli.errors import UsageError
    from carcli.imageio import find_images

    if run.exists() and not run.is_dir():
        raise UsageError(f"--run {run}: exists and is not a folder")
    for option, folders in (("--data", cfg.data), ("--val", cfg.val)):  # type: ignore[attr-defined]
        for name in folders:
            folder = Path(name)
            if option == "--data" and folder.is_file():
                continue
            if not folder.is_dir():
                raise UsageError(f"{option} {folder}: no such folder")
            if not find_images(folder, recursive=option == "--data"):
                raise UsageError(f"{option} {folder}: no images in it")


def _keep_existing_unless(overwrite: bool, output: Path) -> None:
    """Refuse (usage error) before any work when ``output`` exists and ``--overwrite`` is absent."""
    from carcli.errors import UsageError

    if output.exists() and not overwrite:
        raise UsageError(f"{output}: exists (use --overwrite to replace it)")
    if output.is_dir() or output.name in ("", ".", ".."):
        raise UsageError(f"{output}: is a folder; name the output .safetensors file")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (command line or environment), not defaulted."""
    source = ctx.get_parameter_source(name)  # click's ParameterSource, or typer's copy of it
    return source is not None and source.name != "DEFAULT"


def train(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="Run folder: state, log, best checkpoint.")],
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", help="Training image folder (repeatable; needed for a new run)."),
    ] = None,
    val: Annotated[
        list[Path] | None,
        typer.Option("--val", help="Validation folder (repeatable; needed for a new run)."),
    ] = None,
    scale: Annotated[int, typer.Option("--scale", "-s", help="2 or 4.")] = SCALE,
    config: Annotated[
        str,
        typer.Option(
            help="Network preset: fast (re-parameterisable SR network), fast-r2/fast-r4 (its "
            "resampler 2x/4x wider), fast-lite (one shared resampler head), fast-lite-1x1 (that "
            "head ending in a 1x1 conv), fast-lite-no-offsets (kernels only, taps at fixed "
            "places), fast-lite-no-offsets-deep (its rep network deeper), compact, compact-deep "
            "(EDSR 24 blocks), paper, tiny. With --init, a preset that only adds SR blocks "
            "grows the checkpoint's pair to it; one with the same "
            "resampler and another SR network keeps the resampler, new SR network; a fast-lite "
            "preset grafts the pair's resampler onto its shared head.",
        ),
    ] = _D.config,
    steps: Annotated[int | None, typer.Option(help="Total steps (cosine schedule length).")] = None,
    time_budget: Annotated[
        str | None, typer.Option("--time-budget", help="Total training time, e.g. 2h30m.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from RUN/state.pt with its settings; only --steps, --time-budget, "
            "--threads, --val-every, --log-every and --checkpoint-minutes may change."
        ),
    ] = False,
    init: Annotated[
        Path | None, typer.Option(help="Start from an inference checkpoint (.safetensors).")
    ] = None,
    init_sr: Annotated[
        Path | None,
        typer.Option(
            help="Start the SR network from this checkpoint's (a generic upscaler, or another "
            "pair with the same SR design); the resampler still comes from --init or the preset."
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Distil from this trained pair: its round trip of each patch is a second "
            "target. The student's resampler starts as the teacher's when their widths match."
        ),
    ] = None,
    teacher_weight: Annotated[
        float, typer.Option(help="Weight of the loss against the teacher's output.")
    ] = _D.teacher_weight,
    lr_weight: Annotated[
        float,
        typer.Option(
            help="With --teacher: weight of the L1 distance between the student's LR image "
            "and the teacher's, a direct target for a new (cheaper) resampler. 0: off."
        ),
    ] = _D.lr_weight,
    freeze_resampler: Annotated[
        bool,
        typer.Option(
            "--freeze-resampler/--train-resampler",
            help="Train the SR network alone; with --teacher, the LR images and the teacher's "
            "outputs are computed once per training image and cached.",
        ),
    ] = _D.freeze_resampler,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Teacher-target cache folder (default RUN/cache).")
    ] = None,
    lr_source: Annotated[
        str,
        typer.Option(
            help="resampler (a CAR pair) or bicubic: train a generic SR network alone on "
            "bicubic-downscaled images, for photos carcli did not downscale."
        ),
    ] = _D.lr_source,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = _D.batch,
    patch: Annotated[
        int,
        typer.Option(help="HR patch side (multiple of 8)."),
    ] = _D.patch,
    lr: Annotated[float, typer.Option(help="Peak learning rate (Adam).")] = _D.lr,
    min_lr: Annotated[
        float,
        typer.Option(help="Final learning rate of the cosine."),
    ] = _D.min_lr,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = _D.warmup,
    offset_weight: Annotated[
        float,
        typer.Option(help="Offset regulariser weight."),
    ] = _D.offset_weight,
    tv_weight: Annotated[
        float,
        typer.Option(help="TV regulariser weight."),
    ] = _D.tv_weight,
    loss: Annotated[
        str,
        typer.Option(
            help="Reconstruction loss: l1 (the paper's), or mse, which is what PSNR measures "
            "(for a final fine-tune).",
        ),
    ] = _D.loss,
    luma_weight: Annotated[
        float,
        typer.Option(
            help="Add this weight times the same loss on BT.601 luma (Y, what PSNR_Y and SSIM_Y "
            "read) to the RGB loss; 0: RGB only, as in the paper.",
        ),
    ] = _D.luma_weight,
    quant_grad: Annotated[
        str,
        typer.Option(
            help=f"Gradient of the 8-bit rounding: {' or '.join(QUANT_GRADIENTS)} "
            "(straight-through or soft-round).",
        ),
    ] = _D.quant_grad,
    soft_alpha: Annotated[
        float,
        typer.Option(help="Soft-round alpha (with soft)."),
    ] = _D.soft_alpha,
    ema: Annotated[
        float,
        typer.Option(help="EMA decay of the weights (0: off)."),
    ] = _D.ema,
    bicubic_init: Annotated[
        bool,
        typer.Option(
            "--bicubic-init/--no-bicubic-init",
            help="Start the resampler as bicubic.",
        ),
    ] = _D.bicubic_init,
    sr_pretrain: Annotated[
        int,
        typer.Option(
            help="First N steps train only EDSR, on the initial resampler's output.",
        ),
    ] = _D.sr_pretrain,
    reset_heads: Annotated[
        bool,
        typer.Option(
            "--reset-heads/--no-reset-heads",
            help="With --init: fresh kernel/offset heads (bicubic start), rest kept.",
        ),
    ] = _D.reset_heads,
    precision: Annotated[
        str,
        typer.Option(
            help="auto: bf16 autocast where the device computes bfloat16 natively (CUDA, "
            "AVX512-BF16/AMX CPUs), else fp32; or bf16, fp32. The kernel normalisation "
            "and EDSR's first and last convs always run in float32, as in inference.",
        ),
    ] = _D.precision,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="Channels-last memory format (default: with bf16 only; in fp32 on an AVX2 "
            "CPU it was slower).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    val_every: Annotated[
        int,
        typer.Option(help="Validate every N steps (0: never)."),
    ] = _D.val_every,
    log_every: Annotated[
        int,
        typer.Option(help="Log a JSON line every N steps."),
    ] = _D.log_every,
    checkpoint_minutes: Annotated[
        float,
        typer.Option(help="Save state every N minutes."),
    ] = _D.checkpoint_minutes,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _D.seed,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bar or messages (the JSON log is still written)."
        ),
    ] = False,
) -> None:
    """Train a CAR pair (resampler + EDSR) jointly; resumable, validated, exportable.

    The settings, their defaults and the resume rules are TrainConfig's
    (carcli.train.config); this command only collects them, and on --resume
    only those given again.
    """
    from carcli.checkpoints import file_digest
    from carcli.models.config import preset_names
    from carcli.runpolicy import resolve_device
    from carcli.train import ddp
    from carcli.train.progress import make_display
    from carcli.train.trainer import Trainer, config_for_run

    if config not in preset_names():
        raise typer.BadParameter(f"--config must be one of {', '.join(preset_names())}")
    given = {
        "scale": scale, "config": config, "steps": steps, "batch": batch, "patch": patch, "lr": lr,
        "min_lr": min_lr, "warmup": warmup, "offset_weight": offset_weight,
        "tv_weight": tv_weight, "loss": loss, "luma_weight": luma_weight,
        "quant_grad": quant_grad, "soft_alpha": soft_alpha, "ema": ema,
        "bicubic_init": bicubic_init, "sr_pretrain": sr_pretrain, "reset_heads": reset_heads,
        "precision": precision, "channels_last": channels_last, "threads": threads,
        "val_every": val_every, "log_every": log_every,
        "checkpoint_minutes": checkpoint_minutes, "seed": seed,
        "teacher_weight": teacher_weight, "lr_weight": lr_weight,
        "freeze_resampler": freeze_resampler,
        "lr_source": lr_source,
    }  # fmt: skip
    if resume:  # only what was given again: TrainConfig.resumed checks it against the run
        given = {k: v for k, v in given.items() if _given(ctx, k)}
    given = {name: value for name, value in given.items() if value is not None}
    if time_budget is not None:
        given["time_budget"] = parse_duration(time_budget)
    if data is not None:
        given["data"] = [str(d) for d in data]
    if val is not None:
        given["val"] = [str(v) for v in val]
    if init is not None:
        given["init"] = str(init.resolve())
    if init_sr is not None:
        if not init_sr.is_file():
            raise typer.BadParameter(f"{init_sr}: no such file", param_hint="--init-sr")
        given["init_sr"] = str(init_sr.resolve())
        given["init_sr_sha256"] = file_digest(init_sr)
    if teacher is not None:
        if not teacher.is_file():
            raise typer.BadParameter(f"{teacher}: no such file", param_hint="--teacher")
        given["teacher"] = str(teacher.resolve())
        given["teacher_sha256"] = file_digest(teacher)
    if cache_dir is not None:
        given["cache_dir"] = str(cache_dir.resolve())
    if not resume and init is not None and init.is_file():
        given["init_sha256"] = file_digest(init)
    with user_errors():
        # Under torchrun: join the ranks (one GPU each); rank 0 alone talks, validates, saves.
        ranks, dev = ddp.setup(resolve_device(device))
        try:
            quiet = quiet or not ranks.main
            cfg = config_for_run(run, resume, **given)  # before minutes of decoding images
            _check_folders(run, cfg)
            generic = cfg.lr_source == "bicubic"
            evaluator = (
                make_evaluator([Path(v) for v in cfg.val], dev, generic) if cfg.val else None
            )
            display = make_display(quiet)
            trainer = Trainer(
                cfg, run, dev, evaluate=evaluator, quiet=quiet, display=display, ranks=ranks,
                resuming=resume,
            )  # fmt: skip
            if resume:
                trainer.load_state()
        except BaseException:
            ddp.teardown()
            raise
    # Ctrl-C, `kill` (SIGTERM) or a closed terminal (SIGHUP): finish the current step,
    # save the state, stop; the exit code says which (130, or 128 + the signal number).
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        trainer.request_stop()

    for sig in (signal.SIGINT, *SIGNALS):
        signal.signal(sig, stop)
    try:
        trainer.run()
    except ValidationError as exc:
        saved = f"; state saved at step {trainer.step} (--resume continues)" if trainer.step else ""
        typer.echo(f"error: {exc.cli_message()}{saved}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        trainer.close()
        ddp.teardown()
    if trainer.stop_requested:
        signum = received[0] if received else signal.SIGINT
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(f"interrupted{by}: state saved at step {trainer.step}", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)


def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `car train`.")],
    output: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    which: Annotated[
        str, typer.Option(help="best: best validated weights; last: latest (EMA) weights.")
    ] = "best",
    timing: Annotated[
        bool,
        typer.Option(
            help="Measure and record CPU time for a 2 MP round trip; with --no-timing the "
            "--init checkpoint's measurement is kept when it is the same network."
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUTPUT if it exists (the shipped weights, say).")
    ] = False,
    half: Annotated[
        bool,
        typer.Option(
            "--half",
            help="Store the weights as float16: half the file; `car` still computes in "
            "float32 (PSNR changes by about 1e-4 dB).",
        ),
    ] = False,
) -> None:
    """Write an inference checkpoint (safetensors + metadata) from a training run."""
    import torch

    from carcli.errors import UsageError
    from carcli.train.export import export_run
    from carcli.train.trainer import BEST_NAME, LOG_NAME, STATE_NAME, read_state

    if which not in ("best", "last"):
        raise typer.BadParameter("--which must be best or last")
    with user_errors():
        _keep_existing_unless(overwrite, output)
        if not run.is_dir():
            raise UsageError(f"{run}: not a run folder (no such folder)")
        # The run's own files are inputs: replacing state.pt would end the run's resumability.
        for name in (STATE_NAME, BEST_NAME, LOG_NAME):
            if os.path.realpath(output) == os.path.realpath(run / name):
                raise UsageError(
                    f"OUTPUT {output} is the run's own {name}; choose another OUTPUT "
                    "(a run's files are never overwritten)"
                )
        source = run / (BEST_NAME if which == "best" else STATE_NAME)
        if not source.exists():
            hint = " (no validation has run yet: try --which last)" if which == "best" else ""
            raise UsageError(f"{source}: not found{hint}")
        if which == "last":
            read_state(source)  # a damaged or foreign state.pt: one line, before any work

    def validate_latest(model) -> dict | None:  # noqa: ANN001
        """Called only when the latest weights were never validated: the run's --val folders."""
        saved = read_state(source)["config"]
        folders = [Path(v) for v in saved.get("val", []) if Path(v).is_dir()]
        return make_evaluator(folders, torch.device("cpu"))(model) if folders else None

    with user_errors():
        storage = "fp16" if half else "fp32"
        metadata = export_run(run, output, which, timing, validate_latest, storage)
    summary = {"written": str(output), "steps": metadata.get("steps")}
    summary.update({k: metadata[k] for k in ("validation", "cpu_timing") if k in metadata})
    typer.echo(json.dumps(summary))


def average(
    inputs: Annotated[
        list[Path], typer.Argument(help="Two or more checkpoints of one architecture.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file.")],
    val: Annotated[
        list[Path] | None,
        typer.Option("--val", help="Validation folder (repeatable): record the average's metrics."),
    ] = None,
    timing: Annotated[
        bool,
        typer.Option(
            help="Measure CPU time for a 2 MP round trip on this machine; with --no-timing "
            "the last measurement among the inputs is kept (same network, same cost)."
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUTPUT if it exists (never one of the inputs).")
    ] = False,
) -> None:
    """Average the weights of several checkpoints (a model soup) into one checkpoint.

    Warm restarts from one another end close in weight space, and their mean
    often validates better than each; the ingredients' file hashes, steps and
    metrics are kept in the metadata.
    """
    import torch

    from carcli.checkpoints import save_checkpoint
    from carcli.errors import UsageError
    from carcli.train.average import average_checkpoints
    from carcli.train.export import cpu_timing

    with user_errors():
        seen: dict[str, Path] = {}
        for path in inputs:
            real = os.path.realpath(path)
            if real in seen:
                raise UsageError(
                    f"{path} is given twice ({seen[real]}); an average of a file with itself "
                    "weights it double"
                )
            seen[real] = path
        if os.path.realpath(output) in seen:
            raise UsageError(
                f"OUTPUT {output} is one of the inputs; choose another OUTPUT "
                "(inputs are never overwritten)"
            )
        _keep_existing_unless(overwrite, output)
        for folder in val or []:
            if not folder.is_dir():
                raise UsageError(f"--val {folder}: not a folder")
        model, metadata = average_checkpoints(inputs)
    if val:
        metadata["validation"] = make_evaluator(list(val), torch.device("cpu"))(model)
    if timing:
        metadata["cpu_timing"] = cpu_timing(model)
    with user_errors():
        save_checkpoint(model, output, metadata)
    summary = {"written": str(output), "ingredients": len(inputs)}
    summary.update({k: metadata[k] for k in ("validation", "cpu_timing") if k in metadata})
    typer.echo(json.dumps(summary))
