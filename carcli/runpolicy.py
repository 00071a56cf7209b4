"""How a model runs on this machine: device, precision, CPU threads and memory budget.

One policy for every caller: :class:`RunPolicy` holds the choices, and
:func:`carcli.engine.build_processor` applies them, for the ``car`` commands,
the Python API, ``evaluate_folder``, the export's CPU timing and the benches.
Training picks its precision here too (:func:`training_precision`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from carcli.errors import PrecisionError, UsageError, param
from carcli.models.precision import PRECISIONS

P = param("precision")

# Default cap of the memory the tiles of one image may use on the CPU: beyond
# about a gigabyte the margins cost under 15 % and larger tiles buy little speed.
CPU_BUDGET_CAP = 1 << 30
CPU_BUDGET_FRACTION = 0.5  # of the RAM the kernel reports as available
GPU_BUDGET_FRACTION = 0.6  # of the free device memory (plus what torch has cached)
GPU_BUDGET_CAP = 16 << 30


@dataclass(frozen=True)
class RunPolicy:
    """How to run a model: the same defaults for ``car`` and :func:`carcli.roundtrip`.

    ``device``: auto (CUDA when available), cpu, cuda, cuda:N or mps.
    ``precision``: auto (:func:`default_precision`: fp16 on CUDA, bf16 on CPUs
    with native bfloat16, else fp32), fp32, bf16 or fp16.
    ``tile``: tile side in output pixels (None: sized from ``memory_budget``,
    itself None: from free memory, :func:`default_budget`).
    ``threads``: CPU threads, "auto" (:func:`default_threads`, unless
    OMP_NUM_THREADS is set) or "keep" (leave the process's setting alone).
    ``channels_last``: the weights' memory format (faster convolutions on CPUs).
    """

    device: str | torch.device = "auto"
    precision: str = "auto"
    tile: int | None = None
    threads: int | str = "auto"
    channels_last: bool = True
    memory_budget: int | None = None

    def apply_threads(self, device: torch.device) -> None:
        """Set torch's CPU threads as :attr:`threads` says (automatic choice on the CPU only)."""
        if isinstance(self.threads, int):
            set_cpu_threads(self.threads)
        elif self.threads == "auto" and device.type == "cpu":
            set_cpu_threads(None)
        elif self.threads not in ("auto", "keep"):
            threads = param("threads")
            raise UsageError(f"{threads} must be a number, auto or keep, not {self.threads!r}")


# Validation measures in float32 with the model's memory format left alone and the
# trainer's threads kept, so its numbers compare across machines and runs.
VALIDATION = RunPolicy(precision="fp32", threads="keep", channels_last=False)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuse devices this machine lacks."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); else it is emulated."""
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def default_precision(device: torch.device) -> str:
    """fp16 on CUDA, bf16 on CPUs with native bfloat16, else fp32 (docs/performance.md)."""
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def training_precision(spec: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it natively, else fp32.

    On a CPU without AVX512-BF16/AMX, bfloat16 is emulated: a 4x training step
    took 10-14x longer than in fp32 on such a machine (``bench/train_step.py``). fp16 is
    not offered: it would need loss scaling, and bf16 does as well where it exists.
    """
    spec = spec.lower()
    if spec not in ("auto", "bf16", "fp32"):
        raise PrecisionError(f"training {P} must be auto, bf16 or fp32, got {spec!r}")
    if spec != "auto":
        return spec
    if device.type == "cuda":  # bf16, not the fp16 that inference picks there
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return default_precision(device)


def training_channels_last(precision: str) -> bool:
    """Channels-last for training goes with bf16: in fp32 on an AVX2 CPU it was slower."""
    return precision == "bf16"


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto`` -> :func:`default_precision`; refuse what the device cannot do."""
    spec = spec.lower()
    if spec == "auto":
        return default_precision(device)
    if spec not in PRECISIONS:
        raise PrecisionError(f"unknown {P} {spec!r}; use auto, fp32, bf16 or fp16")
    if spec == "fp16" and device.type != "cuda":
        raise PrecisionError(f"{P} fp16 needs a CUDA device; use bf16 or fp32 here")
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"this GPU has no bfloat16; use {P} fp16 or fp32")
    if spec == "bf16" and device.type not in ("cpu", "cuda"):
        raise PrecisionError(f"{P} bf16 is not supported on {device.type}; use fp32")
    return spec


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of ``cpus`` from /proc/stat, or None where there is none."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if int(name[3:]) not in cpus:
                    continue
                # user nice system idle iowait irq softirq steal
                ticks = [int(v) for v in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks[:3]) + sum(ticks[5:])
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def _own_ticks() -> float:
    """CPU time of this process, all threads, in /proc/stat's clock ticks."""
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def busy_cores(cpus: set[int], interval: float = 0.1) -> float:
    """How many of ``cpus`` other processes keep busy now (sampled over ``interval`` seconds).

    Sampled, not the load average: that lags by minutes, so a run started right after
    another (a shell loop, a benchmark) would see its predecessor's load and use one thread.
    Our own threads' time (torch's OpenMP workers may still be spinning) is not counted.
    Falls back to the load average where /proc/stat cannot be read.
    """
    before = _cpu_times(cpus)  # None off Linux
    if before is not None:
        own_before = _own_ticks()
        time.sleep(interval)
        after, own_after = _cpu_times(cpus), _own_ticks()
        if after is not None and after[1] > before[1]:
            busy = after[0] - before[0] - (own_after - own_before)
            return len(cpus) * max(busy, 0) / (after[1] - before[1])
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def default_threads() -> int:
    """CPU threads for the networks: the cores not already busy, at least one.

    torch starts one thread per core, and its threads wait for each other at
    every layer; when other processes keep cores busy, those waits dominate.
    Measured on a 2-core machine running two training jobs (load about 3.4):
    a 0.8 MP round trip at 4x took 1.9 s with one thread and 4.1 s with two.
    ``OMP_NUM_THREADS`` (or ``--threads``) overrides this.
    """
    cores = torch.get_num_threads()
    try:
        cpus = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        cpus = set(range(os.cpu_count() or cores))
    cores = min(cores, len(cpus))
    return max(1, min(cores, round(cores - busy_cores(cpus))))


def set_cpu_threads(threads: int | None) -> None:
    """Apply ``--threads``; without it, :func:`default_threads` unless OMP_NUM_THREADS is set."""
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now: free device memory, or the RAM available to us."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    candidates = []
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    # A cgroup (container) limit can be far below what the host has available.
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(max(int(limit) - used, 0))
    if not candidates:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates) if candidates else 4 << 30


def default_budget(device: torch.device) -> int:
    """Bytes the tiles of one image may use: part of what is free, capped."""
    free = available_memory(device)
    if device.type == "cuda":
        return int(min(free * GPU_BUDGET_FRACTION, GPU_BUDGET_CAP))
    return int(min(free * CPU_BUDGET_FRACTION, CPU_BUDGET_CAP))
