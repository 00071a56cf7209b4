"""The round trip as a measurement: the ``--json`` report, and ``evaluate_folder`` for training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from carcli.batch import NullReporter, Outcome, Reporter, make_items, run_batch
from carcli.engine import build_processor
from carcli.models import CARModel
from carcli.paths import collect_inputs
from carcli.runpolicy import VALIDATION
from carcli.tasks import RoundtripTask


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def roundtrip_report(
    outcomes: Sequence[Outcome], scale: int, compare_bicubic: bool = True
) -> dict[str, Any]:
    """The ``--json`` report: means and per-image numbers of the successful images."""
    records = [o.record for o in outcomes if o.status == "ok"]
    keys = ["file", "psnr", "ssim"] + (["bicubic_psnr", "bicubic_ssim"] if compare_bicubic else [])
    report: dict[str, Any] = {
        "scale": scale,
        "count": len(records),
        "psnr": _mean([r["psnr"] for r in records]),
        "ssim": _mean([r["ssim"] for r in records]),
    }
    if compare_bicubic:
        report["baselines"] = {
            "bicubic": {
                "psnr": _mean([r["bicubic_psnr"] for r in records]),
                "ssim": _mean([r["bicubic_ssim"] for r in records]),
            }
        }
    report["images"] = [{k: r[k] for k in keys} for r in records]
    return report


def evaluate_folder(
    model: CARModel,
    folder: Path,
    recursive: bool = False,
    device: torch.device | str = "cpu",
    compare_bicubic: bool = True,
    reporter: Reporter | None = None,
) -> dict:
    """``car roundtrip FOLDER --json`` without writing files; the report dict it would write.

    Same padding, quantisation, metrics and bicubic baseline as the command,
    in float32 (the :data:`carcli.runpolicy.VALIDATION` policy), so validation
    numbers compare across machines.
    The bicubic numbers are cached per (file, scale), so repeated validation
    only pays for the model. The model is returned to its device and mode.
    ``reporter`` hears about progress and failures (default: nobody).
    """
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        processor = build_processor(model, replace(VALIDATION, device=device))
        task = RoundtripTask(processor, compare_bicubic=compare_bicubic)
        items = make_items(task, collect_inputs(Path(folder), recursive))
        outcomes = run_batch(task, items, reporter or NullReporter())
    finally:
        model.to(home, dtype).train(was_training)
    return roundtrip_report(outcomes, model.scale, compare_bicubic)
