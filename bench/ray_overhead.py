"""Images/s of `car downscale` on one machine vs `car batch downscale` on a local Ray instance.

    python bench/ray_overhead.py ../shared/datasets/train/BSD200 --count 40 --workers 2
    python bench/ray_overhead.py FOLDER -s 2 --json out.json

Both paths run in this process on the same files, alternating, each into a fresh
output folder: the local one as `car downscale` runs it (load the model, then
``run_batch``: decode, compute, encode, write, with the default CPU threads), the
Ray one as `car batch downscale --workers N` runs it on an already started local
Ray instance with as many CPUs as this machine has (``run_on_ray``: plan, start
N actors that each load the model, stream batches through them, collect the
report). Starting Ray itself is timed separately: on a cluster it is paid once,
not per job.

Each path runs on ``count`` and on ``2 * count`` images, so its wall time splits
into a fixed cost (model loading; for Ray also actor start-up and scheduling) and
a steady rate: ``seconds = fixed + images / rate``. The ratio of the rates is the
per-image overhead of the Ray path; the fixed part only matters for small jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from carcli.batch import make_items, run_batch
from carcli.checkpoints import load_model
from carcli.console import ConsoleReporter
from carcli.engine import build_processor
from carcli.imageio import find_images
from carcli.runpolicy import RunPolicy, resolve_device
from carcli.tasks import DownscaleTask


def local_job(folder: Path, out: Path, scale: int, weights: str | None) -> tuple[float, int]:
    """`car downscale FOLDER OUT`: (seconds, images written)."""
    start = time.perf_counter()
    device = resolve_device("auto")
    model, _ = load_model(Path(weights) if weights else None, scale, device)
    processor = build_processor(model, RunPolicy(device))  # as `car downscale`
    task = DownscaleTask(processor, out)
    inputs = [(p, p.relative_to(folder)) for p in find_images(folder)]
    outcomes = run_batch(task, make_items(task, inputs), ConsoleReporter(quiet=True))
    return time.perf_counter() - start, sum(o.status == "ok" for o in outcomes)


def ray_job(
    folder: Path, out: Path, scale: int, weights: str | None, workers: int
) -> tuple[float, int]:
    """`car batch downscale FOLDER OUT --workers N` on the running Ray instance."""
    from carcli.distributed.ray_batch import JobSpec, run_on_ray

    start = time.perf_counter()
    spec = JobSpec("downscale", str(folder), str(out), scale=scale, weights=weights)
    outcomes = run_on_ray(spec, ConsoleReporter(quiet=True), workers=workers)
    return time.perf_counter() - start, sum(o.status == "ok" for o in outcomes)


def subset(source: Path, count: int, into: Path) -> Path:
    """A folder of links to the first ``count`` images of ``source``."""
    into.mkdir(parents=True)
    images = find_images(source)
    if len(images) < count:
        sys.exit(f"{source} has {len(images)} images, fewer than {count}")
    for path in images[:count]:
        (into / path.name).symlink_to(path.resolve())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=40, help="images in the small job")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-s", "--scale", type=int, default=4)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each job and path")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    ray_start = time.perf_counter() - t0
    print(f"ray {ray.__version__}: local instance with {cpus} CPUs started in {ray_start:.1f} s")

    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = (args.count, 2 * args.count)
        folders = {n: subset(args.folder, n, root / f"in{n}") for n in sizes}
        run = 0
        for _ in range(args.repeat):
            for n in sizes:
                for path in ("local", "ray"):
                    run += 1
                    out = root / f"out{run}"
                    if path == "local":
                        seconds, ok = local_job(folders[n], out, args.scale, args.weights)
                    else:
                        seconds, ok = ray_job(
                            folders[n], out, args.scale, args.weights, args.workers
                        )
                    assert ok == n, f"{path}: {ok} of {n} images written"
                    times.setdefault((path, n), []).append(seconds)
                    print(f"{path:5s} {n:4d} images: {seconds:6.2f} s ({n / seconds:.2f} img/s)")
    ray.shutdown()

    result: dict = {"ray_version": ray.__version__, "cpus": cpus, "workers": args.workers}
    result["ray_start_s"] = round(ray_start, 2)
    small, big = sizes
    for path in ("local", "ray"):
        t_small = statistics.median(times[(path, small)])
        t_big = statistics.median(times[(path, big)])
        rate = (big - small) / max(t_big - t_small, 1e-9)
        fixed = t_small - small / rate
        result[path] = {
            f"img_per_s_{small}": round(small / t_small, 3),
            f"img_per_s_{big}": round(big / t_big, 3),
            "steady_img_per_s": round(rate, 3),
            "fixed_s": round(fixed, 2),
        }
    for n in sizes:
        key = f"img_per_s_{n}"
        result[f"ray_vs_local_{n}"] = round(result["ray"][key] / result["local"][key], 3)
    result["ray_vs_local_steady"] = round(
        result["ray"]["steady_img_per_s"] / result["local"]["steady_img_per_s"], 3
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
