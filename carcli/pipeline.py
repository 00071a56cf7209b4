"""Former home of the image pipeline, kept so that existing imports keep working.

The code now lives in one module per job (see the map in :mod:`carcli`):
:mod:`carcli.engine` (the networks on tensors), :mod:`carcli.pictures`,
:mod:`carcli.batch` (the runner), :mod:`carcli.tasks`, :mod:`carcli.evaluation`,
:mod:`carcli.paths`, :mod:`carcli.api` and :mod:`carcli.runpolicy`. New code
should import from those.
"""

from carcli.api import ImageLike, downscale, roundtrip, upscale
from carcli.batch import (
    DEBUG_ENV,
    Item,
    NullReporter,
    Outcome,
    Reporter,
    Result,
    Summary,
    Task,
    make_items,
    run_batch,
    summarize,
)
from carcli.engine import MIN_SIDE, Processor
from carcli.errors import UsageError
from carcli.evaluation import evaluate_folder, roundtrip_report
from carcli.imageio import SCALE_KEY, SOURCE_SIZE_KEY
from carcli.metrics import MEASURE_BAND_ROWS, measure
from carcli.models.quantize import quantize_bits
from carcli.paths import check_paths, collect_inputs, output_target
from carcli.pictures import (
    downscale_batch,
    downscale_picture,
    restored_size,
    roundtrip_picture,
    upscale_batch,
    upscale_picture,
)
from carcli.resize import bicubic_roundtrip
from carcli.runpolicy import resolve_device
from carcli.tasks import _BICUBIC_CACHE, NOTE_16BIT, DownscaleTask, RoundtripTask, UpscaleTask

__all__ = [
    "DEBUG_ENV",
    "MEASURE_BAND_ROWS",
    "MIN_SIDE",
    "NOTE_16BIT",
    "SCALE_KEY",
    "SOURCE_SIZE_KEY",
    "_BICUBIC_CACHE",
    "DownscaleTask",
    "ImageLike",
    "Item",
    "NullReporter",
    "Outcome",
    "Processor",
    "Reporter",
    "Result",
    "RoundtripTask",
    "Summary",
    "Task",
    "UpscaleTask",
    "UsageError",
    "bicubic_roundtrip",
    "check_paths",
    "collect_inputs",
    "downscale",
    "downscale_batch",
    "downscale_picture",
    "evaluate_folder",
    "make_items",
    "measure",
    "output_target",
    "quantize_bits",
    "resolve_device",
    "restored_size",
    "roundtrip",
    "roundtrip_picture",
    "roundtrip_report",
    "run_batch",
    "summarize",
    "upscale",
    "upscale_batch",
    "upscale_picture",
]
