"""The networks and their configurations."""

from carcli.models.car import CARModel, deepened, lr_size, pad_to_multiple, quantize
from carcli.models.config import PRESETS, CARConfig, ResamplerConfig, SRConfig, preset
from carcli.models.edsr import EDSR
from carcli.models.resampler import ResamplerNet, normalize_kernels

__all__ = [
    "EDSR",
    "PRESETS",
    "CARConfig",
    "CARModel",
    "ResamplerConfig",
    "ResamplerNet",
    "SRConfig",
    "deepened",
    "lr_size",
    "normalize_kernels",
    "pad_to_multiple",
    "preset",
    "quantize",
]
