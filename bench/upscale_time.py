"""Time `car upscale`'s compute for a 2 MP output: checkpoints side by side with PIL bicubic.

For the generic upscalers (SR only) next to the pairs' SR networks and plain bicubic, in one
run on the same LR image, with the settings `car` uses (RunPolicy: precision auto, tiles).

Usage: python bench/upscale_time.py CHECKPOINT [CHECKPOINT ...] [-s 4] [--threads 2]
       (a CHECKPOINT may be a pair or a generic upscaler; the first is the baseline)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carcli.checkpoints import load_model
from carcli.engine import build_processor
from carcli.runpolicy import RunPolicy

HR = (1224, 1632)  # 2 MP, 4:3: the size carcli quotes speeds for


def best_of(repeat: int, run) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("-s", "--scale", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = args.scale
    h, w = HR[0] // s, HR[1] // s
    rng = np.random.default_rng(0)
    lr8 = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lr = torch.from_numpy(lr8).permute(2, 0, 1).float().div(255.0)
    pil = Image.fromarray(lr8)
    rows = [("PIL bicubic", best_of(args.repeat, lambda: pil.resize(HR[::-1], Image.BICUBIC)))]
    for path in args.checkpoints:
        model, meta = load_model(path, s, "cpu", upscale_only=True)
        policy = RunPolicy("cpu", args.precision, threads=args.threads)
        processor = build_processor(model, policy)
        processor.upscale(lr, size=HR)  # warm-up: fused weights, allocator
        seconds = best_of(args.repeat, lambda p=processor: p.upscale(lr, size=HR))
        role = "generic" if model.sr_only else "pair's SR"
        label = f"{path.name} ({role}, {model.config.sr.arch}, {processor.precision})"
        rows.append((label, seconds))
    base = rows[1][1]
    print(f"{s}x upscale to {HR[1]}x{HR[0]}, {args.threads} threads, best of {args.repeat}")
    for label, seconds in rows:
        print(f"  {label:70s} {seconds:7.3f} s  ratio {seconds / base:.3f}")


if __name__ == "__main__":
    main()
