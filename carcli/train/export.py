"""Turn a training run into the inference checkpoint that `car` ships and loads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from carcli.checkpoints import (
    WeightsError,
    check_finite,
    config_from_metadata,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from carcli.models import CARConfig, CARModel, preset
from carcli.train.trainer import (
    BEST_NAME,
    STATE_NAME,
    read_state,
    run_metadata,
    validation_at,
)

Evaluate = Callable[[CARModel], dict]  # model -> {set name: {"psnr", "ssim"}}

# A 2-megapixel photo (4:3), the size carcli's speeds are quoted for.
TIMING_SIZE = (1224, 1632)


def cpu_timing(model: CARModel, threads: int | None = None, repeats: int = 2) -> dict:
    """Seconds for downscale, upscale and round trip of a 2 MP image on this CPU (a generic
    upscaler: its upscale to 2 MP only).

    Measured in float32 and in the CPU's default precision (bf16 where the CPU
    has it), best of ``repeats``, with the settings `car` uses, without file I/O.
    """
    from carcli.engine import build_processor
    from carcli.runpolicy import RunPolicy, default_precision

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    result: dict = {
        "image": f"{TIMING_SIZE[1]}x{TIMING_SIZE[0]}",
        "threads": threads or old_threads,
    }
    try:
        image = torch.rand(3, *TIMING_SIZE, generator=torch.Generator().manual_seed(0))
        for precision in dict.fromkeys(("fp32", default_precision(torch.device("cpu")))):
            policy = RunPolicy("cpu", precision, threads="keep")  # as `car`, threads set above
            processor = build_processor(model, policy)
            down = up = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                # A generic upscaler has no resampler: its LR is what the user already has.
                s = model.scale
                lr = image[:, ::s, ::s] if model.sr_only else processor.downscale(image)
                t1 = time.perf_counter()
                processor.upscale(lr, size=TIMING_SIZE)
                t2 = time.perf_counter()
                down, up = min(down, t1 - t0), min(up, t2 - t1)
            times = {"upscale_s": round(up, 2)}
            if not model.sr_only:
                times = {"downscale_s": round(down, 2), **times, "roundtrip_s": round(down + up, 2)}
            result[precision] = times
    finally:
        torch.set_num_threads(old_threads)
    return result


def inherited_timing(recipe: dict, model: CARModel) -> dict | None:
    """The ``--init`` checkpoint's ``cpu_timing`` when it describes this same network.

    A fine-tune costs what its starting point did, so an export without a fresh
    measurement keeps the old one rather than recording none.
    """
    init = Path(recipe.get("init") or "")
    if not init.is_file():
        return None
    try:
        meta = read_metadata(init)
        same_network = config_from_metadata(meta, init) == model.config
    except WeightsError:  # not a carcli checkpoint (e.g. the authors' files): nothing to keep
        return None
    return meta.get("cpu_timing") if same_network else None


def _from_state(run: Path, evaluate: Evaluate | None) -> tuple[CARModel, dict]:
    path = run / STATE_NAME
    state = read_state(path)
    cfg = state["train_config"]
    try:
        config = (
            CARConfig.from_dict(state["model_config"])
            if "model_config" in state
            else preset(cfg.config, cfg.scale)
        )
    except ValueError as exc:
        raise WeightsError(f"{path} records an invalid network ({exc})") from None
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    check_finite(weights, str(path))
    model = CARModel(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0]
        raise WeightsError(f"{path}: its weights do not fit its network ({first})") from None
    model.eval()
    report = validation_at(state["history"], state["step"])
    if report is None:  # the latest weights were never validated: do it now, or record nothing
        report = evaluate(model) if evaluate is not None else None
    return model, run_metadata(cfg, state["step"], state["elapsed"], model, report)


def export_run(
    run: Path,
    output: Path,
    which: str = "best",
    timing: bool = True,
    evaluate: Evaluate | None = None,
    storage: str = "fp32",
) -> dict:
    """Write ``output`` from the run's best validated weights or its latest (EMA) weights.

    ``evaluate`` validates the latest weights when no validation ran at their
    step, so the recorded metrics always belong to the weights written. Without
    ``timing``, the ``--init`` checkpoint's measurement is kept when it is the
    same network.
    """
    if which == "best":
        model, metadata = load_checkpoint(run / BEST_NAME)
    elif which == "last":
        model, metadata = _from_state(run, evaluate)
    else:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    metadata = {k: v for k, v in metadata.items() if k not in ("format", "config", "scale")}
    metadata["source"] = f"carcli train ({which} of {run.name})"
    metadata["parameters"] = model.parameter_counts()  # recounted: runs may predate a fix
    if timing:
        metadata["cpu_timing"] = cpu_timing(model)
    elif (kept := inherited_timing(metadata.get("recipe") or {}, model)) is not None:
        metadata["cpu_timing"] = kept
    save_checkpoint(model, output, metadata, storage)
    return metadata
