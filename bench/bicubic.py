"""Time the bicubic baseline `car roundtrip` scores against: banded product vs dense matrices.

    python bench/bicubic.py                           # 2 MP and 24 MP, 4x and 2x, 2 threads
    python bench/bicubic.py --sizes 1264x1680 --runs 5

For each size and scale it runs MATLAB's 8-bit bicubic round trip (down, rounding to 8
bits, up) the way carcli does (``bicubic_roundtrip``: each axis a banded product of the
few input rows each output reads) and the way it did before (each axis one dense
out x in matrix product, the same weights from ``resize_weights``), checks that both
give the same image, and prints the median wall time of each and their ratio,
measured alternately in one process, with the peak resident memory at the end.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from carcli.resize import _round_uint8 as _round  # MATLAB's rounding, on fresh temporaries
from carcli.resize import bicubic_roundtrip, resize_weights


def dense_roundtrip(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The earlier implementation: every axis one dense matrix product, in float64."""
    h, w = hr.shape[-2:]
    lh, lw = -(-h // scale), -(-w // scale)
    x = _round(hr.double() * 255.0)
    x = _round(resize_weights(h, lh, 1 / scale) @ x)  # rows first: equal scales
    x = _round(x @ resize_weights(w, lw, 1 / scale).T)
    x = _round(resize_weights(lh, lh * scale, float(scale)) @ x)
    x = _round(x @ resize_weights(lw, lw * scale, float(scale)).T)
    return (x[..., :h, :w] / 255.0).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1264x1680", "4000x6000"])
    parser.add_argument("--scales", nargs="+", type=int, default=[4, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed = 0
    print(f"seed {seed}, {args.threads} threads, median of {args.runs} runs, alternating")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        generator = torch.Generator().manual_seed(seed)
        hr = torch.rand(3, h, w, generator=generator).mul_(255).round_().div_(255)
        for scale in args.scales:
            times: dict[str, list[float]] = {"banded": [], "dense": []}
            for _ in range(args.runs):
                for name, fn in (("banded", bicubic_roundtrip), ("dense", dense_roundtrip)):
                    start = time.perf_counter()
                    out = fn(hr, scale)
                    times[name].append(time.perf_counter() - start)
                    if name == "banded":
                        banded = out
                    elif not torch.equal(banded, out):
                        raise SystemExit(f"{size} {scale}x: banded and dense results differ")
            b, d = (statistics.median(times[n]) for n in ("banded", "dense"))
            print(f"{h}x{w} {scale}x: banded {b:.3f} s, dense {d:.3f} s, ratio {b / d:.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory {peak:.2f} GiB (both methods)")


if __name__ == "__main__":
    main()
