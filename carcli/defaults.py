"""Defaults that the command line shows in ``--help``, kept free of heavy imports.

``car --help`` (and every usage error) should answer at once; importing torch
takes seconds, so the modules that the CLI reads at import time must not need it.
"""

from __future__ import annotations

SCALES = (2, 4)  # the scale factors CAR is built for

REFINE_MAX_CHANGE = 4  # 8-bit levels a refined LR pixel may move from the resampler's value

# The rounding gradients of the 8-bit quantisation in training: straight-through, or soft-round.
QUANT_GRADIENTS = ("ste", "soft")
