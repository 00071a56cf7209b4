"""The native resampling op (carcli/ops/csrc, carcli/ops/native.py).

Four groups:

* what only the C++ CPU build has to show (per-pixel loop, borders, tiny
  images, strides, argument checks, the opt-in front), built once per session
  with torch.utils.cpp_extension into the normal per-user cache, so later
  sessions only load it; skipped without a compiler;
* what only the CUDA build has to show (dispatch, fallback on the GPU, 64-bit
  indexing, agreement with the CPU build), skipped without a GPU;
* one tester for both devices: forward, backward, gradcheck and opcheck
  against the reference, parametrised by device;
* nvcc compiling the CUDA sources to catch syntax and template errors on
  machines without a GPU (skipped without nvcc). It runs in the background,
  next to the CPU build, and its test comes last in this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from carcli.ops import native, resample, resample_reference, resample_torch
from carcli.ops.resample import backend_for, register_backend, unregister_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resample_op import slow_resample  # noqa: E402

CSRC = Path(native.__file__).resolve().parent / "csrc"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.native


def random_inputs(
    b, c, h, w, s, offset_scale=1.0, dtype=torch.float64, seed=0, device="cpu", k=None
):
    gen = torch.Generator().manual_seed(seed)
    k = k or 3 * s + 1
    hr = torch.rand(b, c, h * s, w * s, generator=gen, dtype=torch.float64)
    kern = torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64)
    kern = kern / kern.sum(1, keepdim=True)
    dx = (torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64) * 2 - 1) * offset_scale
    dy = (torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64) * 2 - 1) * offset_scale
    return [t.to(device=device, dtype=dtype) for t in (hr, kern, dx, dy)]


def op(hr, kern, dx, dy, s):
    return torch.ops.carcli.resample(hr, kern, dx, dy, s)


def grads(fn, inputs, grad_out, wrt=(0, 1, 2, 3)):
    leaves = [t.detach().clone().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    got = torch.autograd.grad(out, [leaves[i] for i in wrt], grad_out)
    return out, got


def assert_low_precision_grads(got, expected, inputs, scale, tol):
    """Gradients from rounded inputs against the float64 reference on the same values.

    The offset derivative of a bilinear sample jumps where a tap lands exactly on
    a pixel (either one-sided derivative is right there, and the reference picks
    one by the rounding of its normalised grid); rounded offsets land there
    often, so those taps are left out of the offset comparison.
    """
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == inputs[0].dtype
        diff = (g.double() - e).abs()
        if i >= 2:  # offsets_h, offsets_v
            shift = scale * inputs[i].double() + (0.5 if scale % 2 == 0 else 0.0)
            frac = shift - shift.floor()
            diff = diff * (torch.minimum(frac, 1 - frac) > 1e-3)
        assert diff.max().item() <= tol * max(e.abs().max().item(), 1.0), i


# --------------------------------------------------- nvcc (background) --


def _cuda_compile_commands(workdir: Path) -> list[list[str]]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # CPU wheels of torch ship c10/cuda headers without this generated one.
        stub = workdir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
        )
        includes.insert(0, f"-I{workdir / 'stub'}")
    std = ["-std=c++20"]
    kernels = [
        "nvcc", "-c", str(CSRC / "resample_cuda.cu"), "-o", str(workdir / "resample_cuda.o"),
        *std, "-O3",
        "-gencode", "arch=compute_90,code=sm_90",  # Hopper (H100/H200)
        "-gencode", "arch=compute_75,code=compute_75",  # generic PTX, JIT-compiled elsewhere
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        *includes,
    ]  # fmt: skip
    # The CUDA op bindings in resample.cpp (host C++, CARCLI_WITH_CUDA), syntax
    # only: nvcc as the driver supplies the CUDA include directory.
    bindings = [
        "nvcc", "-x", "c++", "-c", str(CSRC / "resample.cpp"), "-o", str(workdir / "glue.o"),
        *std, "-DCARCLI_WITH_CUDA", "-Xcompiler", "-fsyntax-only", "-Xcompiler", "-fopenmp",
        *includes,
    ]  # fmt: skip
    return [kernels, bindings]


@pytest.fixture(scope="session")
def cuda_compile_jobs():
    """Start nvcc on the CUDA sources in the background; yields the running jobs."""
    if shutil.which("nvcc") is None:
        yield None
        return
    workdir = Path(tempfile.mkdtemp(prefix="carcli-nvcc-"))
    jobs = []
    for cmd in _cuda_compile_commands(workdir):
        log = open(workdir / f"log{len(jobs)}.txt", "w+")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        jobs.append((cmd, proc, log))
    yield jobs
    for _, proc, log in jobs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------- CPU build --


@pytest.fixture(scope="session")
def cpu_build(cuda_compile_jobs):
    """The native library with its CPU kernels loaded (compiled once, then cached)."""
    problem = native.toolchain_problem("cpu")
    if problem is not None:
        pytest.skip(f"cannot build the C++ op here: {problem}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = native.load("cpu")
    if not ok:
        pytest.fail(f"the C++ build failed: {native.unavailable_reason('cpu')}")
    return native.loaded_flavour()


CASES = [  # scale, b, c, h, w (LR), offset scale
    (2, 3, 3, 5, 7, 1.0),
    (2, 1, 3, 3, 4, 3.0),
    (4, 3, 3, 3, 5, 1.0),
    (4, 2, 1, 2, 3, 4.0),
    (2, 1, 5, 4, 3, 0.5),  # more channels than one register chunk
    (3, 1, 3, 3, 3, 1.0),  # odd scale: integer block centres (k = 9 below)
]


@pytest.mark.parametrize("scale,h,w,off", [(2, 3, 4, 1.0), (4, 2, 3, 2.5)])
def test_cpu_forward_matches_per_pixel_loop(cpu_build, scale, h, w, off):
    inputs = random_inputs(2, 3, h, w, scale, off, seed=7)
    torch.testing.assert_close(
        op(*inputs, scale), slow_resample(*inputs, scale), rtol=1e-12, atol=1e-12
    )


def test_cpu_offsets_beyond_the_padded_border(cpu_build):
    hr, kern, dx, dy = random_inputs(2, 3, 3, 4, 2, seed=3)
    dx = dx.sign() * 10.0
    dy = -dy.abs() * 10.0
    huge = torch.full_like(dx, 1e30)
    for a, b in ((dx, dy), (huge, -huge), (dx * 0.3, -dy * 0.2)):
        torch.testing.assert_close(
            op(hr, kern, a, b, 2), resample_reference(hr, kern, a, b, 2), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize(
    "scale,b,h,w,k",
    [(4, 1, 1, 1, 13), (4, 2, 1, 2, 13), (2, 1, 1, 1, 7), (1, 1, 1, 3, 3), (1, 1, 2, 2, 5)],
)
def test_cpu_tiny_images_use_the_reference_padding(cpu_build, scale, b, h, w, k):
    """Pads larger than the image: the periodic mirror of the reference (or replicate)."""
    gen = torch.Generator().manual_seed(11)
    hr = torch.rand(b, 3, h * scale, w * scale, generator=gen, dtype=torch.float64)
    kern = torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64)
    dx = torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64) * 4 - 2
    dy = torch.rand(b, k * k, h, w, generator=gen, dtype=torch.float64) * 4 - 2
    torch.testing.assert_close(
        op(hr, kern, dx, dy, scale),
        resample_reference(hr, kern, dx, dy, scale),
        rtol=1e-12,
        atol=1e-12,
    )


def test_cpu_non_contiguous_inputs(cpu_build):
    hr, kern, dx, dy = random_inputs(2, 3, 6, 5, 2, seed=9)
    expected = resample_reference(hr, kern, dx, dy, 2)
    hr_t = hr.transpose(2, 3).contiguous().transpose(2, 3)
    kern_t = kern.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    dx_big = torch.empty(*dx.shape[:3], 2 * dx.shape[3], dtype=dx.dtype)[..., ::2]
    dx_big.copy_(dx)  # a strided view
    assert not hr_t.is_contiguous() and not kern_t.is_contiguous()
    assert not dx_big.is_contiguous()
    torch.testing.assert_close(op(hr_t, kern_t, dx_big, dy, 2), expected, rtol=1e-12, atol=1e-12)


def test_cpu_backward_without_image_gradient(cpu_build):
    inputs = random_inputs(2, 3, 4, 5, 2, seed=2)
    grad_out = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    _, expected = grads(lambda *a: resample_reference(*a, 2), inputs, grad_out, wrt=(1, 2, 3))
    _, got = grads(lambda *a: op(*a, 2), inputs, grad_out, wrt=(1, 2, 3))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    grad_hr, *_ = torch.ops.carcli.resample_backward(grad_out, *inputs, 2, False)
    assert grad_hr.numel() == 0


def test_cpu_rejects_bad_arguments(cpu_build):
    hr, kern, dx, dy = random_inputs(1, 3, 4, 4, 2)
    with pytest.raises(RuntimeError, match="same shape"):
        op(hr, kern, dx[:, :, :3], dy, 2)
    with pytest.raises(RuntimeError, match="must be 8x8"):
        op(hr[..., :7, :], kern, dx, dy, 2)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(hr.float(), kern, dx, dy, 2)
    with pytest.raises(RuntimeError, match="k odd"):
        op(hr, kern[:, :48], dx[:, :48], dy[:, :48], 2)


def test_cpu_fast_path_through_the_resample_front(cpu_build):
    inputs = random_inputs(1, 3, 4, 5, 2, seed=8)
    register_backend("cpp-test", native.resample_native, lambda t: t.device.type == "cpu")
    try:
        assert backend_for(inputs[0]).name == "cpp-test"
        # float kernels with a double image: cast like the reference does
        got = resample(inputs[0], *(t.float() for t in inputs[1:]), 2)
    finally:
        unregister_backend("cpp-test")
    expected = resample_reference(inputs[0], *(t.float() for t in inputs[1:]), 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------ build, cache and fallback --


def test_fallback_warns_once_and_uses_the_torch_op(monkeypatch):
    monkeypatch.setattr(native, "_loaded_flavour", None)
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(native, "toolchain_problem", lambda flavour: "no C++ compiler (test)")
    inputs = random_inputs(1, 3, 3, 4, 2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = native.resample_native(*inputs, 2)
        second = native.resample_native(*inputs, 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler (test)" in messages[0]
    expected = resample_torch(*inputs, 2)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert native.unavailable_reason("cpu") == "no C++ compiler (test)"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CARCLI_NATIVE", "0")
    assert native.toolchain_problem("cpu") == "disabled by CARCLI_NATIVE=0"


def test_build_key_tracks_sources_and_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("CARCLI_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert native.cache_root() == tmp_path / "ext"
    monkeypatch.delenv("CARCLI_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_root() == tmp_path / "xdg" / "carcli" / "torch_extensions"
    key = native.build_key("cpu")
    assert native.build_dir("cpu").name == f"cpu-{key[:16]}"
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    monkeypatch.setattr(native, "CSRC", copy)
    assert native.build_key("cpu") == key
    header = copy / "resample_arith.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert native.build_key("cpu") != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert native.build_key("cpu") not in (key, native.build_key("cuda"))


@pytest.mark.slow
def test_import_compiles_nothing(tmp_path):
    code = (
        "import torch, carcli.ops\n"
        "from carcli.ops import native\n"
        "assert native.loaded_flavour() is None\n"
        "print(carcli.ops.backend_for(torch.zeros(1)).name)\n"
    )
    cache = tmp_path / "cache"
    env = dict(os.environ, CARCLI_NATIVE_CPU="0", CARCLI_EXTENSIONS_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    assert "compiling" not in out.stderr
    assert not cache.exists()


def test_active_backend(monkeypatch):
    monkeypatch.setenv("CARCLI_NATIVE_CPU", "0")
    assert native.active_backend("cpu") == "torch"
    assert native.describe_backend("cpu").startswith("torch")
    if not HAS_CUDA:
        assert native.active_backend("cuda") == "torch"
        assert native.describe_backend("cuda").startswith("torch")


def test_active_backend_cpu_opt_in(cpu_build, monkeypatch):
    monkeypatch.setenv("CARCLI_NATIVE_CPU", "1")
    assert native.active_backend("cpu", build=True) == "cpp"
    assert native.describe_backend("cpu") == "cpp (native, loaded)"


# ------------------------------------------------------------- CUDA --

needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)"
)


@pytest.fixture(scope="session")
def cuda_build():
    if not HAS_CUDA:
        pytest.skip("no CUDA device here")
    problem = native.toolchain_problem("cuda")
    if problem is not None:
        pytest.skip(f"cannot build the CUDA op here: {problem}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = native.load("cuda")
    if not ok:
        pytest.fail(f"the CUDA build failed: {native.unavailable_reason('cuda')}")
    return "cuda"


GPU_CASES = [  # scale, b, c, h, w, offset scale: odd sizes, batch 3, reaching the border
    (2, 3, 3, 17, 23, 1.0),
    (2, 3, 3, 9, 5, 4.0),
    (4, 3, 3, 13, 11, 1.0),
    (4, 3, 3, 7, 9, 5.0),
    (4, 1, 5, 6, 7, 0.7),
]


@pytest.mark.cuda
@needs_cuda
def test_cuda_resample_front_dispatches_to_the_native_op(cuda_build):
    inputs = [t.cuda() for t in random_inputs(2, 3, 5, 6, 2, seed=1)]
    assert backend_for(inputs[0]).name == "cuda"
    assert native.active_backend("cuda") == "cuda"
    hr_t = inputs[0].transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    got = resample(hr_t, *(t.float() for t in inputs[1:]), 2)
    expected = resample_reference(inputs[0], *(t.float() for t in inputs[1:]), 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_cuda_fallback_uses_the_reference_on_the_gpu(monkeypatch):
    monkeypatch.setattr(native, "_loaded_flavour", None)
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(native, "toolchain_problem", lambda flavour: "no CUDA toolkit (test)")
    inputs = random_inputs(1, 3, 3, 4, 2, seed=1, device="cuda")
    with pytest.warns(RuntimeWarning, match="no CUDA toolkit"):
        got = resample(*inputs, 2)
    assert got.is_cuda
    torch.testing.assert_close(got, resample_reference(*inputs, 2), rtol=0, atol=0)
    assert native.active_backend("cuda") == "torch"


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu_build(cuda_build):
    inputs = random_inputs(3, 3, 21, 19, 4, 1.5, dtype=torch.float32, seed=12)
    cpu = op(*inputs, 4)
    gpu = op(*(t.cuda() for t in inputs), 4)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(
    os.environ.get("CARCLI_TEST_LARGE") != "1", reason="set CARCLI_TEST_LARGE=1 (needs ~20 GB)"
)
def test_cuda_64bit_indexing(cuda_build):
    """An image with more than 2^31 elements takes the 64-bit index kernels."""
    s, c, side = 2, 64, 5800  # 64 x 5800 x 5800 > 2^31 elements
    gen = torch.Generator(device="cuda").manual_seed(0)
    hr = torch.rand(1, c, side, side, device="cuda", dtype=torch.float16, generator=gen)
    assert hr.numel() > 2**31
    kern, dx, dy = random_inputs(1, 1, side // s, side // s, s, dtype=torch.float16, seed=3)[1:]
    kern, dx, dy = kern.cuda(), dx.cuda(), dy.cuda()
    out = op(hr, kern, dx, dy, s)
    last = slice(c - 4, c)  # the channels whose offsets exceed 2^31
    expected = resample_reference(hr[:, last].float(), kern.float(), dx.float(), dy.float(), s)
    torch.testing.assert_close(out[:, last].float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scale", [2, 4])
def test_cuda_roundtrip_psnr_matches_cpu(cuda_build, scale):
    from carcli.metrics import psnr_y
    from carcli.models import CARModel, preset

    torch.manual_seed(scale)
    model = CARModel(preset("tiny", scale)).eval()
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(72.0), torch.arange(88.0), indexing="ij")
    hr = torch.stack(
        [0.5 + 0.3 * torch.sin(0.1 * (i + 1) * xx) * torch.cos(0.07 * yy) for i in range(3)]
    )
    hr = (hr + 0.05 * torch.rand(hr.shape, generator=gen)).clamp(0, 1).unsqueeze(0)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            cpu = model(hr).clamp(0, 1)
            gpu = model.cuda()(hr.cuda()).clamp(0, 1).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.cpu()
    assert abs(psnr_y(gpu, hr, shave=scale) - psnr_y(cpu, hr, shave=scale)) < 0.01


# ------------------------------------------------- both devices, one tester --
# The same checks on the C++ CPU build and on the CUDA build, each on its own
# cases and with its own float tolerances (the GPU's fused multiply-adds and
# atomic sums round differently).


def _on(device: str, *cases: tuple) -> list:
    """``pytest.param(device, *case)`` for each case, marked and skipped as the device needs."""
    marks = [pytest.mark.cuda, needs_cuda] if device == "cuda" else []
    return [pytest.param(device, *case, marks=marks) for case in cases]


@pytest.fixture
def built(request: pytest.FixtureRequest):  # noqa: ANN201
    """Call with a device: builds (or skips) that device's native op for this test."""
    return lambda device: request.getfixturevalue(f"{device}_build")


F32_TOL = {"cpu": (1e-5, 1e-6), "cuda": (1e-5, 1e-5)}  # forward (rtol, atol)
F64_GRAD_TOL = {"cpu": 1e-10, "cuda": 1e-9}
HALF_TOL = ((torch.float16, 1e-2), (torch.bfloat16, 2e-2))


@pytest.mark.parametrize(
    "device,scale,b,c,h,w,off",
    _on("cpu", *CASES, (4, 2, 3, 9, 11, 1.0)) + _on("cuda", *GPU_CASES),
)
def test_forward_matches_reference(built, device, scale, b, c, h, w, off):
    """float64 to the last bits; float32 and the half types (which accumulate in float32)."""
    built(device)
    k = 9 if scale == 3 else None
    inputs = random_inputs(b, c, h, w, scale, off, seed=scale * 100 + h * w, k=k)
    expected = resample_reference(*inputs, scale)
    got = op(*(t.to(device) for t in inputs), scale)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
    rtol, atol = F32_TOL[device]
    got32 = op(*(t.to(device, torch.float32) for t in inputs), scale).cpu()
    torch.testing.assert_close(got32.double(), expected, rtol=rtol, atol=atol)
    for dtype, tol in HALF_TOL:
        got = op(*(t.to(device, dtype) for t in inputs), scale)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol)
    # float32 against the float32 reference run on the same device
    inputs32 = [t.to(device, torch.float32) for t in inputs]
    torch.testing.assert_close(
        op(*inputs32, scale), resample_reference(*inputs32, scale), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "device,scale,b,c,h,w,off",
    _on("cpu", *CASES[:4], (4, 1, 3, 5, 6, 1.0)) + _on("cuda", *GPU_CASES[:4]),
)
def test_backward_matches_reference_autograd(built, device, scale, b, c, h, w, off):
    """All four gradients: float64 to the last bits, float32 and fp16 within their precision."""
    built(device)
    inputs = [t.to(device) for t in random_inputs(b, c, h, w, scale, off, seed=scale + h)]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen).to(device)
    _, expected = grads(lambda *a: resample_reference(*a, scale), inputs, grad_out)
    _, got = grads(lambda *a: op(*a, scale), inputs, grad_out)
    tol = F64_GRAD_TOL[device]
    for name, g, e in zip(
        ("image", "kernels", "offsets_h", "offsets_v"), got, expected, strict=True
    ):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2)):
        low = [t.to(dtype) for t in inputs]
        low_grad = grad_out.to(dtype)
        ref_in = [t.double() for t in low]
        _, expected = grads(lambda *a: resample_reference(*a, scale), ref_in, low_grad.double())
        _, got = grads(lambda *a: op(*a, scale), low, low_grad)
        assert_low_precision_grads(got, expected, low, scale, tol)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,scale,b,c,h,w,nondet_tol",
    # On CUDA the image gradient sums with atomics, so two backward passes may differ
    # in the last bits; the CPU build is deterministic.
    _on("cpu", (2, 1, 2, 2, 3, 0.0), (4, 1, 2, 2, 3, 0.0))
    + _on("cuda", (2, 2, 2, 3, 2, 1e-12), (4, 2, 2, 3, 2, 1e-12)),
)
def test_gradcheck(built, device, scale, b, c, h, w, nondet_tol):
    built(device)
    inputs = random_inputs(b, c, h, w, scale, offset_scale=1.3, seed=scale, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda *a: op(*a, scale), leaves, eps=1e-6, atol=1e-6, nondet_tol=nondet_tol
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", _on("cpu", ()) + _on("cuda", ()))
def test_opcheck(built, device):
    """Schema, fake (meta) implementation, autograd registration, and tracing by
    AOTAutograd with dynamic shapes (what torch.compile does)."""
    built(device)
    inputs = random_inputs(1, 3, 3, 4, 2, seed=6, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.carcli.resample.default, (*leaves, 2))


# -------------------------------------------------------- nvcc, last --


@pytest.mark.slow
def test_cuda_sources_compile_with_nvcc(cuda_compile_jobs):
    if cuda_compile_jobs is None:
        pytest.skip("nvcc is not on the PATH")
    for cmd, proc, log in cuda_compile_jobs:
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"nvcc timed out: {' '.join(cmd[:4])}")
        log.seek(0)
        output = log.read()
        assert rc == 0, f"{' '.join(cmd)}\nfailed with:\n{output[-6000:]}"
        assert " error" not in output, output[-6000:]
