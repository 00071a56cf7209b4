"""Mixed precision for the networks: one autocast helper, shared by inference and training.

The networks keep a few float32 islands of their own under autocast (the
kernel normalisation in :class:`ResamplerNet`, EDSR's first and last convs);
this module only says which half type a precision name means.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the networks (convs in bf16/fp16); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=HALF_DTYPES[precision])
