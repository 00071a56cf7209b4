"""Time the resampling op's backends: native, the pure-PyTorch op `car` runs, the reference.

    python bench/resample_op.py                  # CUDA: 2K and 4K images at 2x and 4x
    python bench/resample_op.py --device cpu     # the C++ CPU build, smaller images

For each image size and scale it times the forward pass and forward+backward
(gradients w.r.t. kernels and offsets, as in training) of the native op (where
it builds; ``-`` otherwise), of ``resample_torch`` (the default pure-PyTorch op)
and of ``resample_reference`` on the same device, and the fixed-tap path of a
resampler without offsets (``resample_fixed``; gradients w.r.t. the kernels):
CUDA events (or perf_counter on the CPU) after warm-up, median of ``--runs`` runs.
Next to the native times it prints the bytes the op must move at least (inputs
read once, outputs written once), the achieved bytes/s, and that as a fraction of the bandwidth of a
device-to-device copy measured in the same run, so the distance to the
memory-bound limit is visible.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from carcli.ops import native
from carcli.ops.reference import resample_reference
from carcli.ops.torch_fast import resample_fixed, resample_torch

CUDA_SIZES = {"2K": (1356, 2040), "4K": (2160, 3840)}  # (H, W) of the HR image
CPU_SIZES = {"512px": (336, 512), "1K": (676, 1020)}  # smaller: the reference is slow


def make_inputs(h_hr: int, w_hr: int, scale: int, device, dtype, seed: int = 0):
    k = 3 * scale + 1
    h, w = h_hr // scale, w_hr // scale
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hr = torch.rand(1, 3, h * scale, w * scale, generator=gen)
    kernels = torch.softmax(torch.randn(1, k * k, h, w, generator=gen), dim=1)
    offsets_h = torch.tanh(torch.randn(1, k * k, h, w, generator=gen)) * 0.5
    offsets_v = torch.tanh(torch.randn(1, k * k, h, w, generator=gen)) * 0.5
    return [t.to(device=device, dtype=dtype) for t in (hr, kernels, offsets_h, offsets_v)]


def timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """Median milliseconds of fn() over runs, after warmup calls."""

    def cuda_time(fn, warmup: int, runs: int) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def cpu_time(fn, warmup: int, runs: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cuda_time if device.type == "cuda" else cpu_time


def copy_bandwidth(device: torch.device, dtype: torch.dtype, time_ms, nbytes: int) -> float:
    """Bytes/s of dst.copy_(src) (counting the read and the write)."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.rand(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 3, 20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def min_bytes(inputs, with_backward: bool) -> int:
    """Bytes the op must move: read every input once, write every output once."""
    hr, kernels, offsets_h, offsets_v = inputs
    es = hr.element_size()
    b, c = hr.shape[:2]
    lr = b * c * kernels.shape[2] * kernels.shape[3]
    params = kernels.numel() + offsets_h.numel() + offsets_v.numel()
    forward = (hr.numel() + params + lr) * es
    if not with_backward:
        return forward
    # backward reads hr, kernels, offsets and the output gradient, writes 3 gradients
    return forward + (hr.numel() + params + lr + params) * es


def fwd_bwd(fn, inputs, grad_out):
    hr, *params = inputs
    params = [p.detach().requires_grad_() for p in params]

    def run():
        out = fn(hr, *params)
        torch.autograd.grad(out, params, grad_out)

    return run


def native_fn(hr, kernels, offsets_h, offsets_v, scale):
    return torch.ops.carcli.resample(hr, kernels, offsets_h, offsets_v, scale)


def bench_case(label, h_hr, w_hr, scale, device, dtype, time_ms, bandwidth, args, runs) -> None:
    inputs = make_inputs(h_hr, w_hr, scale, device, dtype)
    ops = {"torch": resample_torch, "reference": resample_reference}
    if args.native:
        ops = {"native": native_fn, **ops}
    with torch.no_grad():
        ref = resample_reference(*inputs, scale).float()
        for name, fn in ops.items():
            err = (fn(*inputs, scale).float() - ref).abs().max().item()
            if err > (1e-4 if dtype == torch.float32 else 2e-2):
                print(f"  warning: {name} and reference differ by {err:.3g}", file=sys.stderr)
        hr, kernels, zero = inputs[0], inputs[1], torch.zeros_like(inputs[2])
        err = resample_fixed(hr, kernels, scale) - resample_reference(
            hr, kernels, zero, zero, scale
        )
        if err.abs().max().item() > (1e-4 if dtype == torch.float32 else 2e-2):
            print("  warning: fixed and reference (offsets 0) differ", file=sys.stderr)
    grad_out = torch.randn_like(ref).to(dtype)
    fixed = lambda hr, kernels: resample_fixed(hr, kernels, scale)  # noqa: E731
    passes = [("forward", False)] if args.no_backward else [("forward", False), ("fwd+bwd", True)]
    for pass_name, with_backward in passes:
        times = {}
        for name, fn in ops.items():
            op = lambda *a, fn=fn: fn(*a, scale)  # noqa: E731
            if with_backward:
                times[name] = time_ms(fwd_bwd(op, inputs, grad_out), args.warmup, runs)
            else:
                with torch.no_grad():
                    times[name] = time_ms(lambda op=op: op(*inputs), args.warmup, runs)
        if with_backward:
            t_fixed = time_ms(fwd_bwd(fixed, inputs[:2], grad_out), args.warmup, runs)
        else:
            with torch.no_grad():
                t_fixed = time_ms(lambda: fixed(*inputs[:2]), args.warmup, runs)
        t_ref, t_torch = times["reference"], times["torch"]
        row = f"{label:<6} {scale:>5} {pass_name:<8} {t_ref:>10.3f} {t_torch:>10.3f} "
        row += f"{t_ref / t_torch:>7.1f}x {t_fixed:>10.3f} {t_torch / t_fixed:>7.1f}x"
        if "native" in times:
            t_native = times["native"]
            nbytes = min_bytes(inputs, with_backward)
            achieved = nbytes / (t_native * 1e-3)
            bound_ms = nbytes / bandwidth * 1e3
            row += (
                f" {t_native:>10.3f} {t_ref / t_native:>7.1f}x {nbytes / 1e6:>9.1f} "
                f"{achieved / 1e9:>7.1f} {achieved / bandwidth:>7.0%} {t_native / bound_ms:>7.1f}x"
            )
        print(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--scales", default="2,4")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(
                "bench/resample_op.py: no CUDA device here (torch.cuda.is_available() is False). "
                "Run it on a GPU machine, or use --device cpu to time the C++ CPU build."
            )
        sizes = CUDA_SIZES
        runs = args.runs or 20
    else:
        torch.set_num_threads(args.threads)
        sizes = CPU_SIZES
        runs = args.runs or 5
    args.native = native.load(device.type)
    if not args.native:
        if device.type == "cuda":
            sys.exit(
                f"bench/resample_op.py: the native op cannot be built here: "
                f"{native.unavailable_reason(device.type)}"
            )
        print(f"native op: not built ({native.unavailable_reason(device.type)}); torch ops only")
    time_ms = timer(device)
    copy_bytes = 1 << 30 if device.type == "cuda" else 1 << 28
    bandwidth = copy_bandwidth(device, dtype, time_ms, copy_bytes)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {name}{threads}; dtype {args.dtype}; median of {runs} runs")
    print(f"device-to-device copy: {bandwidth / 1e9:.1f} GB/s (read + write)")
    print()
    header = f"{'image':<6} {'scale':>5} {'pass':<8} {'ref ms':>10} {'torch ms':>10} {'speedup':>8}"
    header += f" {'fixed ms':>10} {'vs torch':>8}"
    if args.native:
        header += (
            f" {'native ms':>10} {'speedup':>8} {'MB moved':>9} {'GB/s':>7} {'of copy':>8} "
            f"{'x bound':>8}"
        )
    print(header)
    print("-" * len(header))

    for label, (h_hr, w_hr) in sizes.items():
        for scale in (int(s) for s in args.scales.split(",")):
            bench_case(label, h_hr, w_hr, scale, device, dtype, time_ms, bandwidth, args, runs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(
        "speedup = reference / torch (resample_torch); fixed = resample_fixed (no offsets), "
        "'vs torch' = torch / fixed; then reference / native; 'of copy' = "
        "native's bytes/s over the copy bandwidth; 'x bound' = native time over the "
        "memory-bound time (bytes / copy bandwidth)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
