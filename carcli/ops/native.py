"""Native (CUDA / C++) backend of the resampling op, compiled on first use.

The sources in ``csrc/`` define two operators, ``carcli::resample`` and
``carcli::resample_backward``, with CPU (and, in the CUDA build, CUDA)
kernels that share one header of per-pixel arithmetic. This module

* builds them with ``torch.utils.cpp_extension.load`` the first time a
  tensor of the right device arrives, into a per-user cache directory keyed by
  a hash of the sources, the torch / CUDA versions and the target GPU
  architectures, so later runs load the cached library in well under a second
  and a change of any of these rebuilds it;
* registers the autograd formula and the fake (meta) implementation of the
  operators with ``torch.library``, so they train and trace under
  ``torch.compile``;
* registers the ``"cuda"`` backend of :func:`carcli.ops.resample` for CUDA
  tensors. If the extension cannot be built (no CUDA toolkit, compiler or
  ninja, or a failed build) it warns once and falls back to the pure-PyTorch
  reference; it never raises for that reason.

Nothing is compiled or even probed at import time. Environment variables:

``CARCLI_NATIVE=0``
    never build; always use the pure-PyTorch path.
``CARCLI_NATIVE_CPU=1``
    also route CPU tensors through the C++ build (off by default: it is not
    faster than the reference, see :data:`CPU_FAST_PATH_DEFAULT`).
``CARCLI_EXTENSIONS_DIR``
    cache root (default ``$XDG_CACHE_HOME/carcli/torch_extensions``, with
    ``XDG_CACHE_HOME`` defaulting to ``~/.cache``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from carcli.ops.resample import register_backend
from carcli.ops.torch_fast import resample_torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("resample.cpp",)
CUDA_SOURCES = ("resample.cpp", "resample_cuda.cu")
# Everything whose change must trigger a rebuild.
ALL_SOURCE_FILES = (
    "resample.cpp",
    "resample_cuda.cu",
    "resample_arith.h",
    "resample_host.h",
    "resample_cuda.h",
)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Whether CPU tensors use the C++ build without CARCLI_NATIVE_CPU being set.
# Off: measured with bench/resample_op.py --device cpu (2 threads, 512px and
# 1K images), the C++ build is 1.3-2x faster than the reference in the forward
# pass but no faster forward+backward (0.8-1.0x), and single-threaded it is no
# faster at all; the pure-PyTorch op `car` runs (ops.torch_fast) is faster than it
# in the forward pass (2.0-3.3x the reference at 1K against 1.5-2.0x). That does
# not pay for a one-minute compile and a compiler on every CPU-only machine. The
# CPU build is the test vehicle of the shared arithmetic (tests/test_native_op.py);
# CARCLI_NATIVE_CPU=1 routes CPU tensors through it anyway.
CPU_FAST_PATH_DEFAULT = False

# A lock file older than this is taken to be left by a killed build.
_STALE_LOCK_SECONDS = 20 * 60

_lock = threading.RLock()
_loaded_flavour: str | None = None  # "cpu" or "cuda": which build is in this process
_failures: dict[str, str] = {}  # flavour -> why it cannot be built
_warned = False
_python_parts_registered = False


# --------------------------------------------------------------- paths --


def cache_root() -> Path:
    """Directory that holds one sub-directory per build configuration."""
    explicit = os.environ.get("CARCLI_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "carcli" / "torch_extensions"


def _cuda_home() -> str | None:
    if torch.version.cuda is None:  # a CPU-only torch cannot run CUDA kernels
        return None
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _cuda_toolkit_version(cuda_home: str | None) -> str:
    if not cuda_home:
        return "none"
    version_json = Path(cuda_home) / "version.json"
    try:
        data = json.loads(version_json.read_text())
        return str(data.get("cuda", {}).get("version", "unknown"))
    except (OSError, ValueError):
        return f"unknown:{cuda_home}"


def _cuda_arch_list() -> str:
    """The architectures torch will compile for (env override, else the visible GPUs)."""
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return "none"
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _flags(flavour: str) -> dict[str, list[str]]:
    cflags = ["-O3"]
    ldflags: list[str] = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is an OpenMP region compiled into the extension.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if flavour == "cuda":
        cflags.append("-DCARCLI_WITH_CUDA")
    return {
        "extra_cflags": cflags,
        "extra_cuda_cflags": ["-O3"],
        "extra_ldflags": ldflags,
    }


def build_key(flavour: str) -> str:
    """Hash of everything a build depends on: sources, versions, flags, target GPUs."""
    h = hashlib.sha256()
    for name in ALL_SOURCE_FILES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    parts = [
        flavour,
        torch.__version__,
        str(torch.version.cuda),
        f"py{sys.version_info.major}.{sys.version_info.minor}",
        sys.platform,
        os.environ.get("CXX", "c++"),
        json.dumps(_flags(flavour), sort_keys=True),
    ]
    if flavour == "cuda":
        cuda_home = _cuda_home()
        parts += [str(cuda_home), _cuda_toolkit_version(cuda_home), _cuda_arch_list()]
    h.update("\0".join(parts).encode())
    return h.hexdigest()


def build_dir(flavour: str) -> Path:
    return cache_root() / f"{flavour}-{build_key(flavour)[:16]}"


def _library_name(flavour: str) -> str:
    return f"carcli_resample_{flavour}"


def _library_path(flavour: str) -> Path:
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return build_dir(flavour) / f"{_library_name(flavour)}{suffix}"


# ------------------------------------------------------------ building --


def toolchain_problem(flavour: str) -> str | None:
    """Why the given build cannot be attempted here, or None if it can."""
    if os.environ.get("CARCLI_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by CARCLI_NATIVE=0"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install 'carcli[cuda]')"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    if flavour == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        cuda_home = _cuda_home()
        if not cuda_home:
            return "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)"
        nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
        if not nvcc.exists():
            return f"nvcc not found at {nvcc}"
    return None


def _remove_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > _STALE_LOCK_SECONDS:
        with contextlib.suppress(OSError):
            lock.unlink()


def _build(flavour: str) -> None:
    from torch.utils import cpp_extension

    directory = build_dir(flavour)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory)
    if not _library_path(flavour).exists():
        what = "CUDA kernels" if flavour == "cuda" else "C++ CPU kernels"
        print(
            f"carcli: compiling the native resampling op ({what}) into {directory}; "
            "this happens once and takes a minute or two...",
            file=sys.stderr,
            flush=True,
        )
    sources = CUDA_SOURCES if flavour == "cuda" else CPU_SOURCES
    # Build for exactly the architectures in the cache key (the visible GPUs
    # unless TORCH_CUDA_ARCH_LIST says otherwise), without torch's warning.
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if flavour == "cuda" and arch_env is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    try:
        cpp_extension.load(
            name=_library_name(flavour),
            sources=[str(CSRC / s) for s in sources],
            build_directory=str(directory),
            with_cuda=flavour == "cuda",
            is_python_module=False,
            verbose=False,
            **_flags(flavour),
        )
    finally:
        if flavour == "cuda" and arch_env is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _try_flavour(flavour: str) -> bool:
    global _loaded_flavour
    if flavour in _failures:
        return False
    problem = toolchain_problem(flavour)
    if problem is None:
        try:
            _build(flavour)
        except Exception as exc:  # a failed compile must never crash the caller
            first = str(exc).strip().splitlines()
            problem = f"build failed: {first[-1] if first else type(exc).__name__}"
    if problem is not None:
        _failures[flavour] = problem
        return False
    _loaded_flavour = flavour
    _register_python_parts()
    return True


def load(device_type: str = "cuda") -> bool:
    """Make the native op usable for tensors on ``device_type``; True on success.

    Builds (or loads the cached build of) the CUDA flavour for ``"cuda"`` and,
    for ``"cpu"``, the CUDA flavour where it can be built (it contains the CPU
    kernels too), else the CPU-only flavour. Warns once per process and
    returns False when it cannot; never raises for a missing toolchain or a
    failed build.
    """
    if _loaded_flavour == "cuda" or (_loaded_flavour == "cpu" and device_type == "cpu"):
        return True  # fast path for every call after the first
    if device_type not in ("cpu", "cuda"):
        return False
    with _lock:
        if _loaded_flavour == "cuda" or (_loaded_flavour == "cpu" and device_type == "cpu"):
            return True
        if _loaded_flavour == "cpu":  # device_type == "cuda"
            # The operator namespace is taken by the CPU-only library.
            _failures.setdefault("cuda", "the CPU-only build was loaded first in this process")
            _warn_once(_fallback_message("cuda"))
            return False
        if device_type == "cuda":
            if _try_flavour("cuda"):
                return True
            _warn_once(_fallback_message("cuda"))
            return False
        # cpu
        if (
            torch.version.cuda is not None
            and torch.cuda.is_available()
            and toolchain_problem("cuda") is None
            and _try_flavour("cuda")
        ):
            return True
        if _try_flavour("cpu"):
            return True
        _warn_once(_fallback_message("cpu"))
        return False


def _fallback_message(flavour: str) -> str:
    where = "the GPU" if flavour == "cuda" else "the CPU"
    return (
        f"carcli: the native resampling op is unavailable on {where} "
        f"({_failures.get(flavour, 'unknown reason')}); using the pure-PyTorch implementation"
    )


def unavailable_reason(device_type: str) -> str | None:
    """Why the last :func:`load` for this device type failed (None if it did not)."""
    flavour = "cuda" if device_type == "cuda" else "cpu"
    return _failures.get(flavour)


def loaded_flavour() -> str | None:
    """``"cuda"``, ``"cpu"`` or None: which native build this process has loaded."""
    return _loaded_flavour


# ------------------------------------------------ torch.library glue --


def _resample_fake(hr, kernels, offsets_h, offsets_v, scale):
    b, c = hr.shape[0], hr.shape[1]
    h, w = kernels.shape[2], kernels.shape[3]
    return hr.new_empty((b, c, h, w))


def _resample_backward_fake(grad, hr, kernels, offsets_h, offsets_v, scale, image_grad):
    grad_hr = hr.new_empty(hr.shape) if image_grad else hr.new_empty((0,))
    return (
        grad_hr,
        kernels.new_empty(kernels.shape),
        offsets_h.new_empty(offsets_h.shape),
        offsets_v.new_empty(offsets_v.shape),
    )


def _setup_context(ctx, inputs, output):
    hr, kernels, offsets_h, offsets_v, scale = inputs
    ctx.save_for_backward(hr, kernels, offsets_h, offsets_v)
    ctx.scale = scale


def _backward(ctx, grad):
    hr, kernels, offsets_h, offsets_v = ctx.saved_tensors
    image_grad = bool(ctx.needs_input_grad[0])
    grad_hr, grad_k, grad_h, grad_v = torch.ops.carcli.resample_backward(
        grad, hr, kernels, offsets_h, offsets_v, ctx.scale, image_grad
    )
    return (grad_hr if image_grad else None, grad_k, grad_h, grad_v, None)


def _register_python_parts() -> None:
    global _python_parts_registered
    if _python_parts_registered:
        return
    torch.library.register_fake("carcli::resample")(_resample_fake)
    torch.library.register_fake("carcli::resample_backward")(_resample_backward_fake)
    torch.library.register_autograd("carcli::resample", _backward, setup_context=_setup_context)
    _python_parts_registered = True


# ------------------------------------------------------------ backends --


def resample_native(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor,
    offsets_v: torch.Tensor,
    scale: int,
) -> torch.Tensor:
    """The native op where it can run, else the pure-PyTorch op.

    Kernels and offsets are cast to the image's dtype (as the reference does);
    the op itself accumulates in float32 (float64 for double inputs).
    """
    if hr.dtype not in SUPPORTED_DTYPES or not load(hr.device.type):
        return resample_torch(hr, kernels, offsets_h, offsets_v, scale)
    dt = hr.dtype
    return torch.ops.carcli.resample(
        hr, kernels.to(dt), offsets_h.to(dt), offsets_v.to(dt), int(scale)
    )


def cpu_fast_path_enabled() -> bool:
    value = os.environ.get("CARCLI_NATIVE_CPU")
    if value is None:
        return CPU_FAST_PATH_DEFAULT
    return value.strip().lower() in ("1", "true", "yes", "on")


def active_backend(device: torch.device | str, *, build: bool = False) -> str:
    """Which implementation :func:`carcli.ops.resample` uses for tensors on ``device``.

    Returns ``"cuda"`` (the native CUDA kernel), ``"cpp"`` (the C++ CPU build)
    or ``"torch"`` (the pure-PyTorch reference). Without ``build`` nothing is
    compiled: a native build that has not been tried yet is reported as active
    when its toolchain is present (it compiles on first use). With ``build``
    the build is attempted now, so the answer is definitive.
    """
    device = torch.device(device)
    if device.type == "cuda":
        flavour = "cuda"
        name = "cuda"
        if not torch.cuda.is_available():
            return "torch"
    elif device.type == "cpu":
        if not cpu_fast_path_enabled():
            return "torch"
        flavour = "cpu"
        name = "cpp"
    else:
        return "torch"
    if build:
        return name if load(device.type) else "torch"
    if _loaded_flavour == "cuda" or _loaded_flavour == flavour:
        return name
    if flavour in _failures:
        return "torch"
    if flavour == "cpu" and _failures.get("cuda") and toolchain_problem("cpu") is None:
        return name
    return name if toolchain_problem(flavour) is None else "torch"


def describe_backend(device: torch.device | str) -> str:
    """A one-line human description of :func:`active_backend` for ``car info``."""
    device = torch.device(device)
    name = active_backend(device)
    if name == "torch":
        flavour = "cuda" if device.type == "cuda" else "cpu"
        reason = _failures.get(flavour)
        if reason is None and device.type == "cuda":
            reason = toolchain_problem("cuda") if torch.cuda.is_available() else "no GPU"
        if reason is None and device.type == "cpu" and not cpu_fast_path_enabled():
            reason = "C++ CPU path not enabled (CARCLI_NATIVE_CPU=1)"
        return f"torch (pure PyTorch){f': {reason}' if reason else ''}"
    flavour = "cuda" if name == "cuda" else "cpu"
    state = "loaded" if _loaded_flavour in (flavour, "cuda") else "compiles on first use"
    if state != "loaded" and _library_path(flavour).exists():
        state = "cached build"
    return f"{name} (native, {state})"


def _register() -> None:
    register_backend("cuda", resample_native, lambda t: t.device.type == "cuda")
    if cpu_fast_path_enabled():
        register_backend("cpp", resample_native, lambda t: t.device.type == "cpu")


_register()
