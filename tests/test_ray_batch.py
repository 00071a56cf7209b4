"""`car batch` on a local Ray instance: the same files and reports as the local commands.

One Ray instance (2 CPUs) serves the whole module; the images are tiny and the
model is the tiny random one, so each job costs a few seconds of actor start-up.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app
from carcli.report import check_report

runner = CliRunner()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'carcli[ray]')")
    pytest.importorskip("ray.data", reason="ray[data] is not installed")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small photos of four sizes (two pairs share a size), and one broken file."""
    root = tmp_path_factory.mktemp("ray_in")
    sizes = [(40, 48), (48, 48), (40, 48), (56, 32), (48, 48), (33, 47)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(photo(h, w, seed=10 + i)).save(root / f"p{i}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def _car(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def _close(a: object, b: object, key: str = "") -> None:
    """Reports equal, numbers to 1e-6, except paths (other folders) and times."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            if k not in ("input", "output", "outputs", "seconds", "created"):
                _close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{key}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not math.isinf(a):
        assert abs(a - b) <= 1e-6, key
    else:
        assert a == b, key


def test_downscale_upscale_equal_local(
    ray_local: object, folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    common = ["--weights", tiny_weights, "--threads", "1", "-q"]
    local_json = ["--json", tmp_path / "l.json"]
    code, out = _car("downscale", folder, tmp_path / "local", *common, *local_json)
    assert code == 1 and "broken.png" in out  # the broken file fails; the rest are written
    ray_args = ["--workers", "2", "--batch-size", "2", *common]
    code, out = _car(
        "batch", "downscale", folder, tmp_path / "ray", *ray_args, "--json", tmp_path / "r.json"
    )
    assert code == 1 and out.count("error: broken.png") == 1, out
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len(local) == 6 and local == remote  # bit-identical LR PNGs
    report_l, report_r = (json.loads((tmp_path / n).read_text()) for n in ("l.json", "r.json"))
    _close(report_l, report_r)
    assert report_r["count"] == 6 and report_r["failed"][0]["file"] == "broken.png"
    assert check_report(report_r) == [] and report_r["device"] == "cpu"

    # Run again: nothing to do but the broken file (finished outputs are skipped).
    code, out = _car(
        "batch", "downscale", folder, tmp_path / "ray", *ray_args, "--json", tmp_path / "s.json"
    )
    assert code == 1 and len(json.loads((tmp_path / "s.json").read_text())["skipped"]) == 6

    # Upscale through pyarrow's filesystem URIs (file://), against the local upscale.
    _car("upscale", tmp_path / "local", tmp_path / "up_local", *common)
    code, out = _car(
        "batch", "upscale", (tmp_path / "ray").as_uri(), (tmp_path / "up_ray").as_uri(), *ray_args
    )
    assert code == 0, out
    up_local, up_ray = _files(tmp_path / "up_local"), _files(tmp_path / "up_ray")
    assert len(up_local) == 6 and up_local == up_ray
    assert not [p for p in (tmp_path / "up_ray").iterdir() if p.name.startswith(".")]


def test_roundtrip_equal_local(
    ray_local: object, folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    common = ["--weights", tiny_weights, "--threads", "1", "-q", "-s", "2"]
    local_json = ["--json", tmp_path / "l.json"]
    code, _ = _car("roundtrip", folder, "-o", tmp_path / "local", *common, *local_json)
    assert code == 1
    code, out = _car(
        "batch", "roundtrip", folder, tmp_path / "ray", "--workers", "2", "--batch-size", "3",
        *common, "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 1, out
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
    report_l, report_r = (json.loads((tmp_path / n).read_text()) for n in ("l.json", "r.json"))
    assert report_r["count"] == 6 and len(report_r["images"]) == 6
    _close(report_l, report_r)


def test_actor_killed_mid_job(
    ray_local: object, folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    """An actor dies right after its 2nd write: Ray retries its batch on a new actor, the
    job completes, and every output is written exactly once (the lost attempt's are kept)."""
    from carcli.distributed.ray_batch import JobSpec, run_on_ray

    _car("downscale", folder, tmp_path / "local", "--weights", tiny_weights, "--threads", "1", "-q")
    log, marker = tmp_path / "writes.log", tmp_path / "crashed"
    spec = JobSpec(
        "downscale", str(folder), str(tmp_path / "ray"), weights=str(tiny_weights), threads=1,
        hooks={"write_log": str(log), "crash_after": 2, "crash_marker": str(marker)},
    )  # fmt: skip
    outcomes = run_on_ray(spec, _Quiet(), workers=2, batch_size=3)
    assert marker.exists()  # an actor did die
    assert [o.status for o in outcomes].count("ok") == 6
    writes = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(writes) == sorted(str(tmp_path / "ray" / f"p{i}.png") for i in range(6))
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    assert len(pids) >= 2
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


class _Quiet:
    def start(self, total: int, label: str) -> None: ...
    def advance(self, outcome: object) -> None: ...
    def error(self, rel: str, reason: str) -> None: ...
    def warn(self, rel: str, message: str) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self, summary: object) -> None: ...


def test_without_ray_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, folder: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, out = _car("batch", "downscale", folder, tmp_path / "out")
    assert code == 2 and "pip install 'carcli[ray]'" in out
    assert not (tmp_path / "out").exists()
