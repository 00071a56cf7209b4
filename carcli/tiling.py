"""Former home of the tiler and the run policy, kept so that existing imports keep working.

Tiled inference is in :mod:`carcli.tiler`; device, precision, threads and
memory budgets are in :mod:`carcli.runpolicy`; the networks' float32 islands and
receptive-field margins are methods of the models (:mod:`carcli.models`). New
code should import from those.
"""

from carcli.models.precision import PRECISIONS, autocast
from carcli.runpolicy import (
    CPU_BUDGET_CAP,
    CPU_BUDGET_FRACTION,
    GPU_BUDGET_CAP,
    GPU_BUDGET_FRACTION,
    PrecisionError,
    available_memory,
    busy_cores,
    cpu_has_bf16,
    default_budget,
    default_precision,
    default_threads,
    resolve_precision,
    set_cpu_threads,
)
from carcli.tiler import (
    MIN_DOWN_TILE_HR,
    MIN_UP_TILE_LR,
    OP_FIXED_BYTES,
    SAFETY,
    Footprint,
    TiledModel,
    Tiles,
    grid,
    is_oom,
    spans,
)

__all__ = [
    "CPU_BUDGET_CAP",
    "CPU_BUDGET_FRACTION",
    "GPU_BUDGET_CAP",
    "GPU_BUDGET_FRACTION",
    "MIN_DOWN_TILE_HR",
    "MIN_UP_TILE_LR",
    "OP_FIXED_BYTES",
    "PRECISIONS",
    "SAFETY",
    "Footprint",
    "PrecisionError",
    "TiledModel",
    "Tiles",
    "autocast",
    "available_memory",
    "busy_cores",
    "cpu_has_bf16",
    "default_budget",
    "default_precision",
    "default_threads",
    "grid",
    "is_oom",
    "resolve_precision",
    "set_cpu_threads",
    "spans",
]
