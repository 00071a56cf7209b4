"""Time exported SR graphs (`car export-onnx`) in ONNX Runtime on the CPU, side by side.

    car export-onnx new/ -s 4                         # this tree's graphs
    python bench/onnx_runtime.py old/car_x4_sr.onnx new/car_x4_sr.onnx --lr 316x420

Runs every graph on the same seeded random LR image (default 316x420: the LR of a
1264x1680 photo at 4x), in turn, ``--rounds`` times, and prints the median wall time
of each and its ratio to the first, with the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", help="SR .onnx files (input lr, output hr)")
    parser.add_argument("--lr", default="316x420", help="LR size HxW")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime

    h, w = (int(v) for v in args.lr.split("x"))
    seed = 0
    lr = np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = [
        onnxruntime.InferenceSession(g, options, providers=["CPUExecutionProvider"])
        for g in args.graphs
    ]
    outputs = [s.run(None, {"lr": lr})[0] for s in sessions]  # warm-up, and the outputs
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, {"lr": lr})
            times[i].append(time.perf_counter() - start)
    print(f"seed {seed}, LR 1x3x{h}x{w}, {args.threads} threads, median of {args.rounds}")
    base = statistics.median(times[0])
    for graph, taken, out in zip(args.graphs, times, outputs, strict=True):
        median = statistics.median(taken)
        diff = float(np.abs(out - outputs[0]).max())
        print(f"{graph}: {median:.3f} s, ratio {median / base:.3f}, max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
