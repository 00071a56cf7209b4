"""What ``car info`` reports: versions, devices and their resampling backend, installed weights."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from carcli import __version__
from carcli.checkpoints import GENERIC_ROLE, installed_weights, weights_dir
from carcli.models import CARConfig, CARModel
from carcli.models.config import describe
from carcli.ops.native import describe_backend
from carcli.runpolicy import resolve_device


def resampling_backend(device: torch.device) -> str:
    """The resampling implementation ``car`` uses on ``device``, and why (native or PyTorch)."""
    try:
        return describe_backend(device)
    except Exception as exc:  # a broken native build must not break `car info`
        return f"torch (native backend failed: {str(exc).splitlines()[0] if str(exc) else exc})"


def devices() -> list[dict[str, str]]:
    found = [{"device": "cpu", "name": platform.processor() or platform.machine() or "CPU"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            found.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i)})
    if torch.backends.mps.is_available():
        found.append({"device": "mps", "name": "Apple GPU (MPS)"})
    for entry in found:
        entry["backend"] = resampling_backend(torch.device(entry["device"]))
    return found


def _parameters(meta: dict[str, Any]) -> dict[str, int] | None:
    """Parameter counts from the metadata, or by building the config on the meta device."""
    counts = meta.get("parameters")
    if not isinstance(counts, dict):
        try:
            with torch.device("meta"):
                counts = CARModel(CARConfig.from_dict(meta["config"])).parameter_counts()
        except Exception:
            return None
    if meta.get("role") == GENERIC_ROLE:  # no resampler in the file (older ones counted it)
        counts = {k: v for k, v in counts.items() if k != "resampler"}
    return counts


def _architecture(config: dict[str, Any], sr_only: bool = False) -> str | None:
    try:
        return describe(CARConfig.from_dict(config), sr_only)
    except Exception:
        return None


def _validation(meta: dict[str, Any]) -> Any:
    for key in ("validation", "val_metrics", "metrics", "val"):
        if key in meta:
            return meta[key]
    return None


def _compact(value: Any) -> str:
    """Nested metric dicts as ``Set5: psnr=30.1 ssim=0.85; ...`` for a table cell."""
    if isinstance(value, dict):
        parts = []
        for key, sub in value.items():
            inner = _compact(sub)
            parts.append(f"{key}={inner}" if not isinstance(sub, dict) else f"{key}: {inner}")
        return (
            "; ".join(parts)
            if any(isinstance(v, dict) for v in value.values())
            else " ".join(parts)
        )
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def gather(where: Path | None = None) -> dict[str, Any]:
    """Everything ``car info`` shows, JSON-serialisable (``--json`` writes it as is).

    ``where``: list the checkpoints of this file or folder (``--weights``) instead of
    the installed ones.
    """
    weights = []
    for entry in installed_weights(where):
        meta = entry.get("metadata") or {}
        params = _parameters(meta) if meta else None
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        validation = _validation(meta)
        weights.append(
            {
                "scale": entry.get("scale"),
                "role": entry.get("role", "pair"),  # generic: the upscaler for foreign images
                "file": str(entry["path"]),
                "bytes": entry.get("size"),
                "sha256": entry.get("sha256"),
                "config": config.get("name"),
                "architecture": _architecture(config, meta.get("role") == GENERIC_ROLE),
                "parameters": (
                    ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()) if params else None
                ),
                "parameter_counts": params,
                "validation": _compact(validation) if validation is not None else None,
                "metadata": meta,
                "error": entry.get("error"),
            }
        )
    return {
        "versions": {
            "carcli": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "devices": devices(),
        "default_device": str(resolve_device("auto")),
        "weights_dir": str(weights_dir()),
        "weights_listed": str(where) if where is not None else None,
        "weights": weights,
    }
