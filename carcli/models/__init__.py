"""The networks, their configurations and their numerics (precision, margins, rounding)."""

from carcli.models.car import (
    CARModel,
    deepened,
    lr_size,
    op_halo,
    pad_to_multiple,
    with_offsets,
    without_offsets,
)
from carcli.models.config import PRESETS, CARConfig, ResamplerConfig, SRConfig, preset
from carcli.models.edsr import EDSR
from carcli.models.precision import PRECISIONS, autocast
from carcli.models.quantize import quantize, quantize_bits, quantize_for_training
from carcli.models.resampler import ResamplerNet, normalize_kernels
from carcli.models.sr import SRNetwork, build_sr, register_sr, sr_architectures

__all__ = [
    "EDSR",
    "PRECISIONS",
    "PRESETS",
    "CARConfig",
    "CARModel",
    "ResamplerConfig",
    "ResamplerNet",
    "SRConfig",
    "SRNetwork",
    "autocast",
    "build_sr",
    "deepened",
    "lr_size",
    "normalize_kernels",
    "op_halo",
    "pad_to_multiple",
    "preset",
    "quantize",
    "quantize_bits",
    "quantize_for_training",
    "register_sr",
    "sr_architectures",
    "with_offsets",
    "without_offsets",
]
