"""SR networks by name: what every SR network offers, and the registry that builds one.

:class:`CARModel` builds its SR network from ``config.sr.arch`` through
:func:`build_sr`, so an architecture is added by subclassing
:class:`SRNetwork` and calling :func:`register_sr` (as timm's model registry
maps names to builders). The tiler, refinement and training use only the
methods below, never an architecture's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from carcli.models.precision import autocast

if TYPE_CHECKING:
    from carcli.models.config import CARConfig

# Which sides of a feature tile (top, bottom, left, right) are the image's own edges.
Edges = tuple[bool, bool, bool, bool]
ALL_EDGES: Edges = (True, True, True, True)


class SRNetwork(nn.Module):
    """An SR network: 8-bit LR RGB in [0, 1] -> HR RGB (unclamped) at ``scale`` times the size.

    A subclass sets ``scale`` and implements ``forward`` and :meth:`margin`.
    It may split itself into two stages (:meth:`features` at LR, then
    :meth:`reconstruct`) so the tiler can run the second, usually the memory
    peak, in smaller tiles; by default the first stage passes the LR image on.
    The ``precision`` arguments ("fp32", "bf16", "fp16") run the network under
    autocast; a subclass may keep parts of itself in float32 there.
    """

    scale: int

    def margin(self) -> int:
        """LR pixels of context around a tile that make its output equal the untiled one."""
        raise NotImplementedError

    def stage_margins(self) -> tuple[int, int]:
        """(:meth:`features`, :meth:`reconstruct`) LR margins; they add up to :meth:`margin`."""
        return 0, self.margin()

    def features(self, lr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """First stage, at LR resolution (default: the LR image itself)."""
        return lr

    def reconstruct(
        self, feats: torch.Tensor, precision: str = "fp32", edges: Edges = ALL_EDGES
    ) -> torch.Tensor:
        """Second stage: :meth:`features`' output -> the float32 HR image.

        ``edges``: which sides of ``feats`` are the image's own; a network may compute the
        ``stage_margins()[1]`` pixels along the others differently (the tiler crops them).
        """
        with autocast(feats.device, precision):
            return self(feats).float()

    def forward_mixed(self, lr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """``forward`` at ``precision``, as inference, refinement and training all run it."""
        return self.reconstruct(self.features(lr, precision), precision)

    def autograd_elements_per_pixel(self) -> float:
        """Activation values autograd keeps per LR pixel in a forward pass (sizes refinement).

        Default: every leaf module's output, counted on a small probe.
        """
        probe = 16
        total = 0

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            nonlocal total
            total += output.numel() if isinstance(output, torch.Tensor) else 0

        param = next(self.parameters(), None)
        lr = torch.zeros(1, 3, probe, probe, device=param.device if param is not None else None)
        leaves = [m for m in self.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self(lr)
        finally:
            for h in handles:
                h.remove()
        return total / probe**2


def float_head_then_body(net: nn.Module, lr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``x + body(x)``, ``x = head(sub_mean(lr))``: the head in float32, the body under autocast.

    The head reads the 8-bit image, which bfloat16 (8 significant bits) would round by up to a
    quarter of a level; the residual stream then stays in the half type. For networks with
    EDSR's layout (``sub_mean``, ``head``, ``body``): EDSR and the re-parameterisable network.
    """
    x = net.head(net.sub_mean(lr.float()))
    with autocast(x.device, precision):
        if torch.is_autocast_enabled(x.device.type):  # keep the residual stream in half
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x + net.body(x)


SRBuilder = Callable[["CARConfig"], SRNetwork]
_BUILDERS: dict[str, SRBuilder] = {}


def register_sr(name: str, builder: SRBuilder) -> SRBuilder:
    """Make ``SRConfig(arch=name)`` build ``builder(config)``; returns the builder."""
    if name in _BUILDERS and _BUILDERS[name] is not builder:
        raise ValueError(f"SR architecture {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def sr_architectures() -> list[str]:
    """Names ``SRConfig.arch`` may take."""
    return sorted(_BUILDERS)


def build_sr(config: CARConfig) -> SRNetwork:
    """The SR network ``config.sr.arch`` names, built for ``config``."""
    try:
        builder = _BUILDERS[config.sr.arch]
    except KeyError:
        known = ", ".join(sr_architectures())
        raise ValueError(f"unknown SR architecture {config.sr.arch!r}; known: {known}") from None
    return builder(config)
