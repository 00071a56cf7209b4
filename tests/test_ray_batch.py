"""`car batch` on a local Ray instance: the same files and reports as the local commands.

One Ray instance (2 CPUs) serves the whole module; the images are tiny and the
model is the tiny random one, so each job costs a few seconds of actor start-up.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
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


@pytest.mark.parametrize("action", ["downscale", "roundtrip"])
def test_unloadable_weights_fail_each_file_with_one_line(
    ray_local: object, folder: Path, tmp_path: Path, action: str
) -> None:
    """A weights file the actors cannot load: one error line per file and exit 1, no traceback
    (it used to kill the actor and print Ray's)."""
    bad = tmp_path / "car_x4.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, out = _car(
        "batch", action, folder, tmp_path / "out", "--weights", bad, "--threads", "1",
        "--workers", "1", "-q",
    )  # fmt: skip
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in out, out
    assert len(errors) == 7 and all("car_x4.safetensors" in e for e in errors[:-1]), out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


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


# --------------------------------------------------------------------------- upscale per file


@pytest.fixture(scope="module")
def with_generic(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """The tiny pairs and a tiny generic 4x upscaler next to them."""
    from carcli.checkpoints import generic_name, save_checkpoint
    from carcli.models import CARModel, preset

    folder = tmp_path_factory.mktemp("weights_generic")
    for pair in tiny_weights.iterdir():
        shutil.copy(pair, folder / pair.name)
    torch.manual_seed(104)
    save_checkpoint(CARModel(preset("tiny", 4)), folder / generic_name(4), {"role": "generic-sr"})
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """noted.png: `car downscale -s 2` of a 53x41 photo (27x21); plain.png: a 20x16 photo."""
    root = tmp_path_factory.mktemp("mixed")
    source = tmp_path_factory.mktemp("mixed_src")
    Image.fromarray(photo(41, 53, seed=30)).save(source / "noted.png")
    code, out = _car("downscale", source, root, "-s", "2", "-w", tiny_weights, "-q")
    assert code == 0, out
    Image.fromarray(photo(16, 20, seed=31)).save(root / "plain.png")
    return root


def _warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning:")]


def _upscale_both(
    source: Path, tmp_path: Path, weights: Path, *args: str, uri: bool = False
) -> tuple[dict, dict, str, str]:
    """`car upscale` and `car batch upscale` of ``source``: their reports and outputs."""
    common = ["-w", weights, "--threads", "1", "-q", *args]
    code, local_out = _car("upscale", source, tmp_path / "local", *common,
                           "--json", tmp_path / "l.json")  # fmt: skip
    assert code == 0, local_out
    where = [source, tmp_path / "ray"]
    if uri:  # pyarrow's filesystem: the actors read the notes, the driver cannot cheaply
        where = [p.as_uri() for p in where]
    code, ray_out = _car("batch", "upscale", *where, "--workers", "1", "--batch-size", "2",
                         *common, "--json", tmp_path / "r.json")  # fmt: skip
    assert code == 0, ray_out
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")  # the same bytes
    reports = [json.loads((tmp_path / n).read_text()) for n in ("l.json", "r.json")]
    assert check_report(reports[1]) == []
    _close(*reports)  # models, scale, device, sizes: the same report
    return reports[0], reports[1], local_out, ray_out


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: Image.open(p).size for p in folder.glob("*.png")}


def test_upscale_picks_scale_and_model_per_file(
    ray_local: object, mixed: Path, tmp_path: Path, with_generic: Path
) -> None:
    """No --scale: the noted file at its 2x to its exact source size with the 2x pair, the
    plain one at 4x with the generic upscaler, as `car upscale` does (and says)."""
    _, report, local_out, ray_out = _upscale_both(mixed, tmp_path, with_generic)
    assert _sizes(tmp_path / "ray") == {"noted.png": (53, 41), "plain.png": (80, 64)}
    generic = with_generic / "car_generic_x4.safetensors"
    models = [(m["role"], m["scale"], [f["path"] for f in m["files"]]) for m in report["models"]]
    assert models == [
        ("pair", 2, [str(with_generic / "car_x2.safetensors")]),
        ("generic", 4, [str(generic)]),
    ]
    assert report["scale"] is None  # two scales ran
    said = (
        "warning: 1 of 2 images carry no carcli note (not made by `car downscale`): the CAR "
        f"upscaler is trained on its own downscaled images; using the generic upscaler {generic} "
        "for them"
    )
    assert _warnings(ray_out) == _warnings(local_out) == [said]


def test_upscale_explicit_scale_overrides_the_note(
    ray_local: object, mixed: Path, tmp_path: Path, with_generic: Path
) -> None:
    _, report, local_out, ray_out = _upscale_both(mixed, tmp_path, with_generic, "-s", "4")
    assert _sizes(tmp_path / "ray") == {"noted.png": (108, 84), "plain.png": (80, 64)}
    assert [(m["role"], m["scale"]) for m in report["models"]] == [("pair", 4), ("generic", 4)]
    assert report["scale"] == 4
    assert "noted.png: was downscaled at 2x, upscaling at 4x" in ray_out


def test_upscale_without_a_generic_upscaler_uses_the_pair_and_says_so(
    ray_local: object, mixed: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    """Only pairs next to the weights; inputs as file:// URIs, so the actors read the notes."""
    assert not list(tiny_weights.glob("car_generic_*"))
    _, report, local_out, ray_out = _upscale_both(mixed, tmp_path, tiny_weights, uri=True)
    assert _sizes(tmp_path / "ray") == {"noted.png": (53, 41), "plain.png": (80, 64)}
    assert [(m["role"], m["scale"]) for m in report["models"]] == [("pair", 2), ("pair", 4)]
    said = (
        "warning: 1 of 2 images carry no carcli note (not made by `car downscale`): the CAR "
        "upscaler is trained on its own downscaled images; results may be worse than bicubic "
        "(no generic upscaler car_generic_x4.safetensors is installed next to the weights)"
    )
    assert _warnings(ray_out) == _warnings(local_out) == [said]


def test_upscale_actor_loads_only_the_models_its_files_need(
    mixed: Path, tmp_path: Path, with_generic: Path
) -> None:
    """An actor (called in this process, without Ray) loads a model the first time a file
    needs it, keeps it, and runs each model's files apart."""
    from carcli.distributed.ray_batch import JobSpec, _worker_class

    spec = JobSpec("upscale", str(mixed), str(tmp_path), scale=None, weights=str(with_generic),
                   threads=1)  # fmt: skip
    worker = _worker_class(spec)()
    assert worker.models == {}

    def call(*names: str) -> list[dict]:
        batch = {
            "index": list(range(len(names))),
            "src": [str(mixed / n) for n in names],
            "rel": list(names),
            "outputs": [json.dumps({"image": str(tmp_path / n)}) for n in names],
        }
        rows = worker(batch)
        assert rows["status"] == ["ok"] * len(names), rows["error"]
        return [json.loads(extra) for extra in rows["extra"]]

    extra = call("noted.png", "noted.png")
    assert list(worker.models) == [(2, None)]  # only the 2x pair
    assert extra[0]["model"]["role"] == "pair" and extra[0]["foreign"] is None
    generic = with_generic / "car_generic_x4.safetensors"
    extra = call("plain.png", "noted.png")
    assert list(worker.models) == [(2, None), (4, generic)]
    assert [(e["model"]["role"], e["model"]["scale"]) for e in extra] == [
        ("generic", 4),
        ("pair", 2),
    ]
    assert extra[0]["foreign"] == [4, str(generic)]


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
