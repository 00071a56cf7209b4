"""The ``--json`` report: one schema for ``car downscale``, ``upscale`` and ``roundtrip``.

A script that runs carcli over a folder must be able to tell, from the report
alone, which files failed and why, which were skipped, and exactly which
weights, device and precision produced the outputs (so a result can be
reproduced or a regression traced to a checkpoint). The schema is documented
in ``docs/report-schema.md``; :data:`SCHEMA` names its version and
:func:`check_report` states it in code (the tests use it on every command).

No torch here: building a report only reads the batch's outcomes.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carcli import __version__

if TYPE_CHECKING:
    from carcli.batch import Outcome

SCHEMA = "carcli-report/1"
COMMANDS = ("downscale", "upscale", "roundtrip")
SKIP_REASON = "output exists (--overwrite replaces it)"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str | None:
    """SHA-256 of a file (cached by path, mtime and size); None when it cannot be read."""
    try:
        stat = os.stat(path)
        return _sha256(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None


@dataclass
class ModelInfo:
    """Which weights ran: ``role`` ``pair`` (CAR resampler + SR) or ``generic`` (SR only)."""

    scale: int
    files: list[Path]
    role: str = "pair"

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "scale": self.scale,
            "files": [{"path": str(p), "sha256": file_sha256(p)} for p in self.files],
        }


@dataclass
class RunInfo:
    """What a report says about the run besides the per-image results."""

    command: str
    input: str
    output: str | None
    device: str
    precision: str
    models: list[ModelInfo] = field(default_factory=list)
    scale: int | None = None
    seconds: float | None = None


def build_report(
    run: RunInfo, outcomes: Sequence[Outcome], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The report dict of one run: header, counts, ``images``, ``failed`` and ``skipped``.

    ``extra`` adds command-specific top-level keys (the round trip's means and
    baselines); it may not replace the common ones.
    """
    ok = [o for o in outcomes if o.status == "ok"]
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "command": run.command,
        "carcli_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": run.input,
        "output": run.output,
        "scale": run.scale,
        "device": run.device,
        "precision": run.precision,
        "models": [m.to_json() for m in run.models],
        "seconds": None if run.seconds is None else round(run.seconds, 3),
        "total": len(outcomes),
        "count": len(ok),
        "failed_count": len(failed),
        "skipped_count": len(skipped),
        "images": [_image_record(o) for o in ok],
        "failed": [{"file": o.item.rel, "error": o.error or "failed"} for o in failed],
        "skipped": [
            {"file": o.item.rel, "reason": SKIP_REASON, "outputs": _outputs(o)} for o in skipped
        ],
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"report key {key!r} is common to all commands; not replaced")
        report[key] = value
    return report


def _outputs(outcome: Outcome) -> list[str]:
    return [str(p) for p in outcome.item.outputs.values()]


def _image_record(outcome: Outcome) -> dict[str, Any]:
    record = dict(outcome.record)
    record.setdefault("file", outcome.item.rel)
    record.setdefault("outputs", _outputs(outcome))
    record["seconds"] = round(outcome.seconds, 3)
    return record


# --------------------------------------------------------------------------- the schema in code

# key -> allowed types (None: JSON null allowed). Every report has all of these.
_COMMON: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "command": (str,),
    "carcli_version": (str,),
    "created": (str,),
    "input": (str,),
    "output": (str, type(None)),
    "scale": (int, type(None)),
    "device": (str,),
    "precision": (str,),
    "models": (list,),
    "seconds": (float, int, type(None)),
    "total": (int,),
    "count": (int,),
    "failed_count": (int,),
    "skipped_count": (int,),
    "images": (list,),
    "failed": (list,),
    "skipped": (list,),
}
_IMAGE: dict[str, dict[str, tuple[type, ...]]] = {
    "downscale": {"file": (str,), "outputs": (list,), "width": (int,), "height": (int,)},
    "upscale": {"file": (str,), "outputs": (list,), "width": (int,), "height": (int,)},
    "roundtrip": {
        "file": (str,),
        "outputs": (list,),
        "width": (int,),
        "height": (int,),
        "psnr": (float, type(None)),
        "ssim": (float, type(None)),
    },
}


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float as None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def report_text(report: dict[str, Any]) -> str:
    """The report as strict JSON (RFC 8259), indented, one trailing newline.

    Python's json would write ``Infinity`` for the PSNR of an image that came back
    identical, which JavaScript, Go, jq's strict readers and most JSON tools refuse:
    such values are written as null (the report's "no number" everywhere else too).
    """
    return json.dumps(_finite(report), indent=2, default=str, allow_nan=False) + "\n"


def _non_finite(value: Any, where: str) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where} is {value}: JSON has no such number"]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _non_finite(item, f"{where}.{key}")]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _non_finite(item, f"{where}[{i}]")]
    return []


def check_report(report: dict[str, Any]) -> list[str]:
    """Everything in ``report`` that breaks the schema (an empty list when it conforms)."""
    problems = _check_keys(report, _COMMON, "report")
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema is {report['schema']!r}, not {SCHEMA!r}")
    if report["command"] not in COMMANDS:
        problems.append(f"unknown command {report['command']!r}")
        return problems
    counts = (report["count"], report["failed_count"], report["skipped_count"])
    if counts != (len(report["images"]), len(report["failed"]), len(report["skipped"])):
        problems.append("count/failed_count/skipped_count disagree with the lists")
    if sum(counts) != report["total"]:
        problems.append("total is not the sum of count, failed_count and skipped_count")
    for i, model in enumerate(report["models"]):
        where = f"models[{i}]"
        problems += _check_keys(model, {"role": (str,), "scale": (int,), "files": (list,)}, where)
        for j, entry in enumerate(model.get("files", [])):
            spec = {"path": (str,), "sha256": (str, type(None))}
            problems += _check_keys(entry, spec, f"{where}.files[{j}]")
    for i, image in enumerate(report["images"]):
        problems += _check_keys(image, _IMAGE[report["command"]], f"images[{i}]")
    for i, entry in enumerate(report["failed"]):
        problems += _check_keys(entry, {"file": (str,), "error": (str,)}, f"failed[{i}]")
    for i, entry in enumerate(report["skipped"]):
        spec = {"file": (str,), "reason": (str,), "outputs": (list,)}
        problems += _check_keys(entry, spec, f"skipped[{i}]")
    return problems + _non_finite(report, "report")


def _check_keys(data: Any, spec: dict[str, tuple[type, ...]], where: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where} is not an object"]
    problems = []
    for key, types in spec.items():
        if key not in data:
            problems.append(f"{where} lacks {key!r}")
        elif not isinstance(data[key], types) or (
            isinstance(data[key], bool) and bool not in types
        ):
            problems.append(f"{where}[{key!r}] is {type(data[key]).__name__}")
    return problems
