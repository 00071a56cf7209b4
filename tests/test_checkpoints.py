"""Saving/loading carcli checkpoints and the authors' kgn.pth/usn.pth folders.

The official-layout tests build their synthetic files from the key listing in
docs/official-checkpoints.md, hard-coded here rather than derived from our
modules, so a drift in our layout fails these tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import carcli.checkpoints as ck
from carcli.checkpoints import (
    FORMAT,
    GENERIC_ROLE,
    NoWeightsInstalled,
    WeightsError,
    installed_weights,
    load_checkpoint,
    load_model,
    load_official,
    save_checkpoint,
    shipped_name,
    weights_dir,
)
from carcli.models import CARConfig, CARModel, preset

Layout = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------- documented layout


def conv(name: str, cout: int, cin: int, k: int) -> Layout:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def doc_resampler_layout(scale: int) -> Layout:
    """kgn.pth keys and shapes exactly as listed in official-checkpoints.md."""
    taps = {4: 169, 2: 49}[scale]
    up = {4: 1024, 2: 4096}[scale]
    layout: Layout = {}
    layout |= conv("sub_mean", 3, 3, 1)
    layout |= conv("ds_1.1", 64, 3, 5)
    layout |= conv("ds_2.downsample.1", 128, 256, 1)
    layout |= conv("ds_4.downsample.1", 128, 512, 1)
    for n in range(5):
        layout |= conv(f"res_4.{n}.transform.1", 128, 128, 3)
        layout |= conv(f"res_4.{n}.transform.4", 128, 128, 3)
    layout |= conv("ds_8.downsample.1", 256, 512, 1)
    for trunk, head_names in (
        ("kernels_trunk", ["kernels_weight"]),
        ("offsets_trunk", ["offsets_h_generation", "offsets_v_generation"]),
    ):
        for i in (1, 4, 7):
            layout |= conv(f"{trunk}.{i}", 256, 256, 3)
        layout |= conv(f"{trunk}.9.upsample.0", up, 256, 1)
        layout |= conv(f"{trunk}.11", 256, 256, 3)
        for head in head_names:
            layout |= conv(f"{head}.1", 256, 256, 3)
            layout |= conv(f"{head}.4", taps, 256, 3)
    return layout


def doc_edsr_layout(scale: int) -> Layout:
    """usn.pth keys and shapes exactly as listed in official-checkpoints.md."""
    layout: Layout = {}
    layout |= conv("sub_mean", 3, 3, 1)
    layout |= conv("add_mean", 3, 3, 1)
    layout |= conv("head.0", 256, 3, 3)
    for n in range(32):
        layout |= conv(f"body.{n}.body.0", 256, 256, 3)
        layout |= conv(f"body.{n}.body.2", 256, 256, 3)
    layout |= conv("body.32", 256, 256, 3)
    layout |= conv("tail.0.0", 1024, 256, 3)
    if scale == 4:
        layout |= conv("tail.0.2", 1024, 256, 3)
    layout |= conv("tail.1", 3, 256, 3)
    return layout


def random_state(layout: Layout, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Fresh random float32 tensors, scaled by fan-in so a forward pass stays finite."""
    state = {}
    for key, shape in layout.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 100
        state[prefix + key] = torch.randn(shape).mul_(1 / math.sqrt(fan_in))
    return state


def strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def write_official(folder: Path, kgn: dict | Path, usn: dict | Path) -> Path:
    """A kgn.pth/usn.pth folder; a Path argument is linked instead of rewritten (saves time)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (("kgn.pth", kgn), ("usn.pth", usn)):
        if isinstance(obj, Path):
            (folder / name).symlink_to(obj)
        else:
            torch.save(obj, folder / name)
    return folder


class NotAStateDict:
    """A custom object: weights_only loading must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = torch.zeros(3)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions on shared cores: a second thread only adds synchronisation waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/2x and <root>/4x, each holding synthetic module.-prefixed kgn.pth and usn.pth."""
    root = tmp_path_factory.mktemp("official")
    for s in (2, 4):
        write_official(
            root / f"{s}x", random_state(doc_resampler_layout(s)), random_state(doc_edsr_layout(s))
        )
    return root


@pytest.fixture(scope="module", params=[2, 4], ids=["2x", "4x"])
def paper(request: pytest.FixtureRequest, official_root: Path) -> SimpleNamespace:
    """One paper-size model loaded by load_official and one loaded by hand, per scale."""
    s = request.param
    folder = official_root / f"{s}x"
    kgn = strip(torch.load(folder / "kgn.pth", weights_only=True))
    usn = strip(torch.load(folder / "usn.pth", weights_only=True))
    loaded = load_official(folder)  # scale inferred from the kernel head
    direct = CARModel(preset("paper", s))
    direct.resampler.load_state_dict(kgn)
    direct.sr.load_state_dict(usn)
    direct.eval()
    return SimpleNamespace(scale=s, folder=folder, kgn=kgn, usn=usn, loaded=loaded, direct=direct)


# ----------------------------------------------------------------------------- carcli format


def tiny(scale: int) -> CARModel:
    model = CARModel(preset("tiny", scale))
    with torch.no_grad():  # non-default values everywhere, mean shifts included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


METADATA = {
    "recipe": {"lr": 1e-4, "betas": [0.9, 0.999], "loss": {"l1": 1.0, "tv": 0.005}},
    "training_data": "DIV2K train (800)",
    "steps": 12345,
    "val": {"psnr_y": 31.234567890123, "ssim": 0.912345678, "nan": None},
    "tiny_float": 1.2345678901234567e-09,
    "flags": [True, False],
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_save_refuses_to_replace_a_non_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        save_checkpoint(tiny(2), fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.safetensors"]


@pytest.mark.parametrize("scale", [2, 4])
def test_round_trip_tiny(tmp_path: Path, scale: int) -> None:
    model = tiny(scale)
    path = tmp_path / shipped_name(scale)
    save_checkpoint(model, path, METADATA)
    loaded, meta = load_checkpoint(path)

    assert not loaded.training
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    hr = torch.rand(1, 3, 21, 30)
    with torch.no_grad():
        assert torch.equal(model(hr), loaded(hr))

    for key, value in METADATA.items():
        assert meta[key] == value, key
    assert meta["format"] == FORMAT
    assert meta["scale"] == scale
    assert meta["config"] == model.config.to_dict()


def test_file_layout(tmp_path: Path) -> None:
    """Keys, dtype and string metadata as other tools (and future carcli) will read them."""
    model = tiny(4)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"steps": 7})
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert raw["format"] == FORMAT
    assert json.loads(raw["config"]) == model.config.to_dict()
    assert json.loads(raw["scale"]) == 4
    assert raw["steps"] == "7"
    assert dtypes == {torch.float32}
    expected = {f"resampler.{k}" for k in model.resampler.state_dict()}
    expected |= {f"sr.{k}" for k in model.sr.state_dict()}
    assert keys == expected
    assert {"resampler.sub_mean.bias", "sr.sub_mean.bias", "sr.add_mean.weight"} <= keys


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "car_x2.safetensors"
    save_checkpoint(tiny(2), path)
    before = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(WeightsError, match="cannot write .*: disk full"):
        save_checkpoint(tiny(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_converts_common_metadata_types(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    extra = {"data": tmp_path, "loss": torch.tensor(0.25), "scale": 2}
    save_checkpoint(tiny(2), path, extra)
    meta = load_checkpoint(path)[1]
    assert meta["data"] == str(tmp_path)
    assert meta["loss"] == 0.25
    with pytest.raises(ValueError, match="scale"):
        save_checkpoint(tiny(2), path, {"scale": 4})


def write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def tiny_tensors_and_header(scale: int = 2) -> tuple[dict, dict]:
    model = tiny(scale)
    tensors = {f"resampler.{k}": v for k, v in model.resampler.state_dict().items()}
    tensors |= {f"sr.{k}": v for k, v in model.sr.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "scale": str(scale)}
    return tensors, header


def test_checkpoint_errors(tmp_path: Path) -> None:
    tensors, header = tiny_tensors_and_header()

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_checkpoint(garbage)

    with pytest.raises(WeightsError, match="without carcli metadata"):
        load_checkpoint(write_raw(tmp_path / "plain.safetensors", tensors, None))

    other = header | {"format": "somebody-else/3"}
    with pytest.raises(WeightsError, match="somebody-else/3"):
        load_checkpoint(write_raw(tmp_path / "other.safetensors", tensors, other))

    dropped = dict(tensors)
    del dropped["sr.tail.1.bias"]
    dropped["resampler.extra.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError) as err:
        load_checkpoint(write_raw(tmp_path / "keys.safetensors", dropped, header))
    # The resampler is checked first, then the SR network; each names its offenders.
    assert "1 unexpected key (extra.weight)" in str(err.value)
    del dropped["resampler.extra.weight"]
    with pytest.raises(WeightsError, match=r"1 missing key \(tail\.1\.bias\)"):
        load_checkpoint(write_raw(tmp_path / "keys2.safetensors", dropped, header))

    reshaped = tensors | {"resampler.ds_1.1.bias": torch.zeros(5)}
    with pytest.raises(WeightsError, match=r"ds_1\.1\.bias: file \(5\), model \(8\)"):
        load_checkpoint(write_raw(tmp_path / "shape.safetensors", reshaped, header))

    stray = tensors | {"optimizer.step": torch.zeros(1)}
    with pytest.raises(WeightsError, match="optimizer.step"):
        load_checkpoint(write_raw(tmp_path / "stray.safetensors", stray, header))

    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_error_lists_first_keys_and_count(tmp_path: Path) -> None:
    tensors, header = tiny_tensors_and_header()
    sr_only = {k: v for k, v in tensors.items() if k.startswith("sr.")}
    with pytest.raises(WeightsError) as err:
        load_checkpoint(write_raw(tmp_path / "half.safetensors", sr_only, header))
    message = str(err.value)
    total = len(tiny(2).resampler.state_dict())
    assert f"{total} missing keys (sub_mean.weight, " in message
    assert f"{total - 5} more)" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- load_model, install


def test_load_model_shipped_and_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARCLI_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path
    assert installed_weights() == []
    with pytest.raises(NoWeightsInstalled) as err:
        load_model(None, 4)
    message = str(err.value)
    assert "4x" in message and str(tmp_path / "car_x4.safetensors") in message
    assert "pass weights FILE_OR_FOLDER" in message  # the library names its parameter,
    assert "pass --weights FILE_OR_FOLDER" in err.value.cli_message()  # the CLI its flag

    model = tiny(4)
    save_checkpoint(model, tmp_path / shipped_name(4), {"steps": 10})
    loaded, meta = load_model(None, 4)
    assert meta["steps"] == 10
    assert torch.equal(loaded.sr.tail[1].weight, model.sr.tail[1].weight)
    with pytest.raises(NoWeightsInstalled):
        load_model(None, 2)

    (tmp_path / shipped_name(2)).write_bytes(b"not weights")
    listed = {entry["scale"]: entry for entry in installed_weights()}
    assert listed[4]["path"] == tmp_path / shipped_name(4)
    assert listed[4]["size"] == (tmp_path / shipped_name(4)).stat().st_size
    assert listed[4]["metadata"]["steps"] == 10
    assert "error" not in listed[4]
    saved = (tmp_path / shipped_name(4)).read_bytes()
    assert listed[4]["sha256"] == hashlib.sha256(saved).hexdigest()
    assert "not a safetensors file" in listed[2]["error"]
    assert listed[2]["sha256"] == hashlib.sha256(b"not weights").hexdigest()


def test_listing_a_file_or_folder_the_user_names(tmp_path: Path, official_root: Path) -> None:
    """`car info --weights`: any checkpoint name in a folder, generic ones by their metadata,
    broken files as errors, and the authors' folders by the scale in their resampler."""
    save_checkpoint(tiny(4), tmp_path / "my-run-best.safetensors", {"steps": 7})
    generic = tiny(2)
    save_checkpoint(generic, tmp_path / "upscaler.safetensors", {"role": GENERIC_ROLE})
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    (tmp_path / "notes.txt").write_text("not weights")
    listed = {entry["path"].name: entry for entry in installed_weights(tmp_path)}
    assert sorted(listed) == [
        "broken.safetensors",
        "my-run-best.safetensors",
        "upscaler.safetensors",
    ]
    assert listed["my-run-best.safetensors"]["scale"] == 4
    assert listed["my-run-best.safetensors"]["role"] == "pair"
    assert listed["my-run-best.safetensors"]["metadata"]["steps"] == 7
    assert listed["upscaler.safetensors"]["role"] == "generic"
    assert listed["upscaler.safetensors"]["scale"] == 2
    assert "not a safetensors file" in listed["broken.safetensors"]["error"]
    [one] = installed_weights(tmp_path / "my-run-best.safetensors")
    assert one["sha256"] == listed["my-run-best.safetensors"]["sha256"]

    by_scale = {entry["scale"]: entry for entry in installed_weights(official_root)}
    assert sorted(by_scale) == [2, 4]
    for s, entry in by_scale.items():
        assert entry["path"] == official_root / f"{s}x" and "error" not in entry
        assert entry["metadata"]["source"] == "official"
        assert CARConfig.from_dict(entry["metadata"]["config"]) == preset("paper", s)
    assert [e["scale"] for e in installed_weights(official_root / "2x" / "usn.pth")] == [2]
    half = write_official(tmp_path / "half", official_root / "4x" / "kgn.pth", {})
    (half / "usn.pth").unlink()
    [entry] = installed_weights(half)
    assert entry["error"] == f"{half} has no usn.pth (the authors' folder holds both files)"
    assert installed_weights(tmp_path / "empty") == []


def test_default_weights_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARCLI_WEIGHTS", raising=False)
    # Package data: found inside the installed package (a wheel or this checkout).
    assert weights_dir() == Path(ck.__file__).resolve().parent / "weights"
    assert (weights_dir() / "car_x4.safetensors").is_file()
    monkeypatch.setenv("CARCLI_WEIGHTS", "~/elsewhere")
    assert weights_dir() == Path.home() / "elsewhere"


def test_load_model_files_and_folders(tmp_path: Path) -> None:
    model = tiny(2)
    save_checkpoint(model, tmp_path / shipped_name(2))
    by_file, _ = load_model(tmp_path / shipped_name(2), 2)
    by_folder, _ = load_model(tmp_path, 2)
    for loaded in (by_file, by_folder):
        assert torch.equal(loaded.resampler.ds_1[1].weight, model.resampler.ds_1[1].weight)

    with pytest.raises(WeightsError, match="holds 2x weights, but 4x was requested"):
        load_model(tmp_path / shipped_name(2), 4)
    with pytest.raises(WeightsError, match="weights for 2x only"):
        load_model(tmp_path, 4)
    with pytest.raises(WeightsError, match="does not exist") as err:
        load_model(tmp_path / "missing", 2)
    assert str(tmp_path / "missing") in str(err.value)


# ----------------------------------------------------------------------------- official weights


def test_documented_layout_sizes() -> None:
    """The hard-coded listing agrees with the sizes the method notes quote."""
    count = lambda layout: sum(math.prod(s) for s in layout.values())  # noqa: E731
    assert round(count(doc_resampler_layout(4)) / 1e6, 1) == 9.9
    assert round(count(doc_resampler_layout(2)) / 1e6, 1) == 10.6  # "about 10.7M"
    assert round(count(doc_edsr_layout(4)) / 1e6) == 43


@pytest.mark.slow
def test_official_tensors_land_in_place(paper: SimpleNamespace) -> None:
    s, loaded = paper.scale, paper.loaded
    assert loaded.scale == s and loaded.config == preset("paper", s)
    assert not loaded.training
    for net, file_state, layout in (
        (loaded.resampler, paper.kgn, doc_resampler_layout(s)),
        (loaded.sr, paper.usn, doc_edsr_layout(s)),
    ):
        ours = net.state_dict()
        assert list(file_state) == list(layout)
        assert set(ours) == set(layout)
        for key, shape in layout.items():
            assert tuple(ours[key].shape) == shape, key
            assert torch.equal(ours[key], file_state[key]), key


def test_official_outputs_match_direct_load(paper: SimpleNamespace) -> None:
    """Same tensors, same outputs: nothing is transposed, renamed or left at its init."""
    hr = torch.rand(1, 3, 16, 16)
    lr = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        ours = [*paper.loaded.resampler(hr), paper.loaded.sr(lr)]
        ref = [*paper.direct.resampler(hr), paper.direct.sr(lr)]
    taps = (3 * paper.scale + 1) ** 2
    assert ours[0].shape == (1, taps, 16 // paper.scale, 16 // paper.scale)
    assert ours[3].shape == (1, 3, 4 * paper.scale, 4 * paper.scale)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.slow
def test_load_model_official_folders(official_root: Path, tmp_path: Path) -> None:
    """A folder with 2x/ and 4x/, and a plain kgn/usn folder without ``module.``, both resolve.

    The second is then converted to carcli's format: the authors' weights, mean
    shifts included, must survive exactly.
    """
    model, meta = load_model(official_root, 4)
    assert model.scale == 4 and meta["source"] == "official" and meta["scale"] == 4
    usn4 = torch.load(official_root / "4x" / "usn.pth", weights_only=True)
    assert torch.equal(model.sr.tail[-1].bias, usn4["module.tail.1.bias"])

    kgn = strip(torch.load(official_root / "2x" / "kgn.pth", weights_only=True))
    usn = strip(torch.load(official_root / "2x" / "usn.pth", weights_only=True))
    plain = write_official(tmp_path / "plain", kgn, official_root / "2x" / "usn.pth")
    model, meta = load_model(plain, 2)
    assert model.scale == 2 and meta["source"] == "official" and meta["scale"] == 2
    assert meta["config"] == preset("paper", 2).to_dict()

    path = tmp_path / shipped_name(2)
    save_checkpoint(model, path, {"source": "official"})
    again, meta = load_checkpoint(path)
    assert meta["source"] == "official" and meta["config"]["name"] == "paper"
    for net, file_state in ((again.resampler, kgn), (again.sr, usn)):
        ours = net.state_dict()
        assert set(ours) == set(file_state)
        for key, value in file_state.items():
            assert torch.equal(ours[key], value), key
    with pytest.raises(WeightsError, match="pick a scale"):
        load_official(official_root)


def test_official_wrong_scale(official_root: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is a 2x resampler, but 4x was requested"):
        load_official(official_root / "2x", scale=4)
    for where in (official_root / "4x", official_root / "4x" / "kgn.pth"):
        with pytest.raises(WeightsError, match="is a 4x resampler, but 2x was requested"):
            load_model(where, 2)
    only_2x = tmp_path / "only"
    (only_2x / "2x").mkdir(parents=True)
    with pytest.raises(WeightsError, match="no 4x/ subfolder"):
        load_official(only_2x, scale=4)
    mixed = write_official(
        tmp_path / "mixed", official_root / "4x" / "kgn.pth", official_root / "2x" / "usn.pth"
    )
    with pytest.raises(WeightsError, match=r"kgn\.pth is for 4x but .*usn\.pth is for 2x"):
        load_official(mixed)


def edit(state: dict, drop: str | None = None, add: str | None = None, **shapes: tuple) -> dict:
    out = dict(state)
    if drop:
        del out["module." + drop]
    if add:
        out["module." + add] = torch.zeros(4)
    for key, shape in shapes.items():
        out["module." + key.replace("__", ".")] = torch.zeros(shape)
    return out


MISMATCHES = {
    "kgn": (
        {
            "drop": "res_4.3.transform.4.bias",
            "add": "res_4.5.transform.1.weight",
            "ds_1__1__weight": (64, 3, 3, 3),
        },
        [
            "1 missing key (res_4.3.transform.4.bias)",
            "1 unexpected key (res_4.5.transform.1.weight)",
            "1 shape mismatch (ds_1.1.weight: file (64, 3, 3, 3), model (64, 3, 5, 5))",
        ],
    ),
    "usn": ({"drop": "body.31.body.2.weight"}, ["1 missing key (body.31.body.2.weight)"]),
}


@pytest.mark.parametrize("which", MISMATCHES)
def test_official_layout_mismatch(official_root: Path, tmp_path: Path, which: str) -> None:
    change, expected = MISMATCHES[which]
    src = official_root / "2x"
    state = torch.load(src / f"{which}.pth", weights_only=True)
    edited = edit(state, **change)
    if which == "kgn":
        folder = write_official(tmp_path / "w", edited, src / "usn.pth")
    else:
        folder = write_official(tmp_path / "w", src / "kgn.pth", edited)
    with pytest.raises(WeightsError) as err:
        load_official(folder, scale=2)
    message = str(err.value)
    for part in expected:
        assert part in message
    assert f"{which}.pth" in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (NotAStateDict(), "pickled .*NotAStateDict object, not plain tensors; refused"),
        ([torch.zeros(2)], "holds a list, not a state_dict"),
        (
            {"epoch": 3, "module.ds_1.1.bias": torch.zeros(64)},
            "entry 'epoch' holds int, not a tensor",
        ),
        (b"\x00garbage", "is not a plain PyTorch tensor file .*; refused"),
        (b"", "empty or truncated"),
        (b"PK\x03\x04junk", "cannot read .* as a PyTorch file"),
    ],
    ids=["custom-class", "list", "non-tensor", "garbage", "empty", "bad-zip"],
)
def test_official_refuses_non_state_dicts(
    official_root: Path, tmp_path: Path, content: object, expected: str
) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    if isinstance(content, bytes):
        (folder / "kgn.pth").write_bytes(content)
    else:
        torch.save(content, folder / "kgn.pth")
    (folder / "usn.pth").symlink_to(official_root / "2x" / "usn.pth")
    with pytest.raises(WeightsError, match=expected):
        load_official(folder, scale=2)
    with pytest.raises(WeightsError, match=expected):
        load_model(folder, 2)


def test_official_missing_files(tmp_path: Path, official_root: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_official(tmp_path / "absent")
    half = tmp_path / "half"
    half.mkdir()
    (half / "kgn.pth").symlink_to(official_root / "4x" / "kgn.pth")
    with pytest.raises(WeightsError, match="has no usn.pth"):
        load_model(half, 4)
    with pytest.raises(WeightsError, match="neither"):
        load_official(tmp_path)
