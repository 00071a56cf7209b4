"""`car train` on many processes: DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node=N car train ...`` (or ``-m carcli train``) starts N
ranks; :func:`setup` joins them (gloo on CPUs, NCCL on GPUs, one GPU per rank).
The rules, in one place:

* each rank draws its own ``--batch`` patches, from a sampler seeded with
  :func:`rank_seed` (rank 0 draws exactly what a one-process run draws), so a
  step updates the weights once on an *effective batch* of ``batch x ranks``;
* gradients are averaged over the ranks (DDP's all-reduce) before clipping and
  Adam, so N ranks of batch b take the same step as one process of batch N*b on
  the same patches (``tests/test_ddp.py`` checks it to 1e-6);
* ``--lr`` is used as given for the effective batch: it is not scaled with the
  number of ranks (to keep a run's recipe, keep ``batch x ranks``);
* rank 0 alone validates, logs, saves the state and exports; the state records
  every rank's sampler, so resuming with as many ranks continues each stream,
  and resuming with another number re-seeds them from (seed, rank, step);
* the stopping decision (steps, time budget, Ctrl-C on any rank) is rank 0's
  and every rank's together, taken in one all-reduce per step, so no rank waits
  forever for another that stopped.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Separates the ranks' patch streams: rank r's sampler starts from seed + r * RANK_STRIDE.
RANK_STRIDE = 1_000_003


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the ranks (1 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank validates, logs, saves and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes; this rank's device (its own GPU).

    Without torchrun this is one rank on ``device`` and no process group.
    """
    if not launched():
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


def teardown() -> None:
    """Leave the process group while the interpreter is still whole.

    DDP's reducer holds the group and tensors that Python owns, and a trainer that wrapped
    its step in DDP is a reference cycle. Left to the interpreter's last collection, their
    C++ destructors run when no thread may take the GIL any more, and the rank aborts
    ("terminate called without an active exception", once in CI). So collect them first;
    callers drop their wrappers (:meth:`Trainer.close`) before this.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The patch sampler's seed for a rank (and, after a resume with other ranks, a step)."""
    return seed + rank * RANK_STRIDE + step * 7_919 * RANK_STRIDE


def wrap(
    losses: Callable[[torch.Tensor, bool], dict[str, torch.Tensor]],
    module: torch.nn.Module,
    ranks: Ranks,
    device: torch.device,
    unused_parameters: bool,
) -> Callable[[torch.Tensor, bool], dict[str, torch.Tensor]]:
    """``losses(hr, freeze)`` run through DDP, which averages the gradients over the ranks.

    ``module`` holds the parameters ``losses`` trains; ``unused_parameters`` when some
    get no gradient in some steps (SR pre-training freezes the resampler).
    """
    if not ranks.distributed:
        return losses

    class _Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, hr: torch.Tensor, freeze: bool) -> dict[str, torch.Tensor]:
            return losses(hr, freeze)

    ids = [device.index] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(
        _Step(), device_ids=ids, find_unused_parameters=unused_parameters
    )
    return lambda hr, freeze: model(hr, freeze)


def agree(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value's maximum over the ranks, in one all-reduce (the values, on one rank).

    Flags (as 0/1) become "any rank", clocks "the slowest rank's".
    """
    if not ranks.distributed:
        return [float(v) for v in values]
    on = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather(obj: object, ranks: Ranks) -> list[object]:
    """Every rank's ``obj`` (on every rank), in rank order."""
    if not ranks.distributed:
        return [obj]
    out: list[object] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out
