"""Property: whatever is done to the bytes of small PNG/JPEG/WebP files, a batch stays sane.

For every file of a batch of mutated files (bit flips, cuts, inserted and
overwritten bytes): an output or exactly one error line naming it, exit code 0
or 1, no traceback, no temp file left, and the inputs byte for byte unchanged
(issue 37, "keep it that way").

The default run is short and derandomized (the same examples every time);
``--fuzz-examples N`` or ``CARCLI_FUZZ_EXAMPLES=N`` runs N random examples,
reproducible with hypothesis's printed ``--hypothesis-seed`` (or the example it
reports on failure).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app

DEFAULT_EXAMPLES = 8


def fuzz_examples(config: pytest.Config) -> int:
    option = config.getoption("--fuzz-examples", default=None)
    return int(option or os.environ.get("CARCLI_FUZZ_EXAMPLES") or 0)


def _encode(fmt: str, array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save)
    return buf.getvalue()


# Small seeds, one per decoder path: 8-bit RGB and RGBA and palette PNG, 16-bit grey PNG,
# baseline and progressive JPEG, lossless and lossy WebP.
SEEDS: dict[str, bytes] = {
    "rgb.png": _encode("PNG", photo(14, 11, seed=1)),
    "rgba.png": _encode("PNG", photo(9, 13, seed=2, channels=4)),
    "pal.png": _encode("PNG", photo(12, 12, seed=3)[..., 0]),
    "grey16.png": _encode("PNG", (photo(10, 9, seed=4)[..., 0].astype(np.uint16) * 257)),
    "base.jpg": _encode("JPEG", photo(16, 12, seed=5), quality=80),
    "prog.jpg": _encode("JPEG", photo(11, 17, seed=6), quality=90, progressive=True),
    "lossless.webp": _encode("WEBP", photo(13, 10, seed=7), lossless=True),
    "lossy.webp": _encode("WEBP", photo(10, 15, seed=8), quality=70),
}

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("write"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
)
damaged_file = st.tuples(st.sampled_from(sorted(SEEDS)), st.lists(mutation, max_size=4))


def mutate(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for edit in edits:
        if not out:
            break
        at = edit[1] % len(out)
        if edit[0] == "flip":
            out[at] ^= 1 << edit[2]
        elif edit[0] == "cut":
            del out[at:]
        elif edit[0] == "insert":
            out[at:at] = edit[2]
        else:
            out[at : at + len(edit[2])] = edit[2]
    return bytes(out)


def check_batch(files: list[tuple[str, list[tuple]]], weights: Path, command: str) -> None:
    """Run one batch of mutated files through ``command`` and check the property."""
    with tempfile.TemporaryDirectory(prefix="carcli-fuzz-") as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        written: dict[str, bytes] = {}
        for i, (seed, edits) in enumerate(files):
            name = f"{i:02d}-{seed}"
            written[name] = mutate(SEEDS[seed], edits)
            (src / name).write_bytes(written[name])
        args = [command, str(src), "-w", str(weights), "-q"]
        if command != "roundtrip":
            args.insert(2, str(out))
        else:
            args += ["-o", str(out)]
        result = CliRunner().invoke(app, args)

        assert "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(
            result.exception
        )
        assert result.exit_code in (0, 1), result.output
        error_lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        for name in written:
            stem = Path(name).stem
            produced = (
                [out / "sr" / f"{stem}.png", out / "lr" / f"{stem}.png"]
                if command == "roundtrip"
                else [out / f"{stem}.png"]
            )
            mine = [x for x in error_lines if x.startswith(f"error: {name}: ")]
            if all(p.is_file() for p in produced):
                assert mine == [], (name, result.stderr)
                for path in produced:
                    with Image.open(path) as im:
                        im.load()  # a complete, decodable image
            else:
                assert len(mine) == 1, (name, result.stderr)
                assert not any(p.exists() for p in produced), (name, result.stderr)
        assert len(error_lines) == sum(
            1 for x in error_lines if any(x.startswith(f"error: {n}: ") for n in written)
        ), result.stderr
        assert (result.exit_code == 1) == bool(error_lines), result.output
        leftovers = [p for p in Path(tmp).rglob("*") if ".carcli-tmp-" in p.name]
        assert leftovers == []
        assert {p.name: p.read_bytes() for p in src.iterdir()} == written  # inputs untouched


@pytest.mark.parametrize("command", ["downscale", "upscale", "roundtrip"])
def test_mutated_images_never_break_a_batch(
    tiny_weights: Path, pytestconfig: pytest.Config, command: str
) -> None:
    requested = fuzz_examples(pytestconfig)
    examples = requested or DEFAULT_EXAMPLES
    print(f"fuzz: {examples} example(s) of {command}, {'random' if requested else 'fixed'}")

    @settings(
        max_examples=examples,
        derandomize=not requested,  # the default run sees the same examples every time
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(damaged_file, min_size=1, max_size=5))
    def batch(files: list[tuple[str, list[tuple]]]) -> None:
        check_batch(files, tiny_weights, command)

    batch()


def test_every_seed_is_an_image_and_mutations_damage_it(tiny_weights: Path) -> None:
    """The seeds themselves go through cleanly; hand-picked damage fails with one line each."""
    plain = [(name, []) for name in sorted(SEEDS)]
    check_batch(plain, tiny_weights, "downscale")
    cuts = [(name, [("cut", len(SEEDS[name]) // 2)]) for name in sorted(SEEDS)]
    header = [(name, [("cut", 20)]) for name in ("rgb.png", "base.jpg", "lossy.webp")]
    check_batch(cuts + header, tiny_weights, "downscale")
