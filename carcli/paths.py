"""Where a command reads and writes: INPUT files, and OUTPUT checked against INPUT.

Part of the command line (its messages name INPUT, OUTPUT and flags); the
library's own functions take tensors and pictures, not paths to check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from carcli.errors import UsageError
from carcli.formats import (
    STDIN_NAME,
    STDIO,
    ImageWriteError,
    find_images,
    format_for_suffix,
    is_image_path,
    is_stdio,
)


def check_input(source: Path) -> None:
    """INPUT must exist and be a file or folder, or be ``-`` (standard input).

    A FIFO or device given as INPUT is refused here: reading one blocks until
    something writes to it, possibly forever.
    """
    if is_stdio(source):
        return
    if not os.path.lexists(source):
        raise UsageError(f"INPUT {source} does not exist")
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise UsageError(f"INPUT {source}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise UsageError(
            f"INPUT {source} is {kind}, not a file or folder (use - to read standard input)"
        )


def check_report_target(
    report: Path | None, inputs: Iterable[Path], outputs: Iterable[Path]
) -> None:
    """``--json FILE`` gets the protection images get: never an input, never an output.

    Any command that writes a report calls this before any work. It refuses a
    report that would replace one of the run's input images, one of its own
    outputs (which a resumed run would then skip for good), an existing image,
    or a folder.
    """
    if report is None or is_stdio(report):
        return
    report = Path(report)
    if report.is_dir():
        raise UsageError(f"--json {report} is a folder; give a file name for the report")
    real = os.path.realpath(report)
    outputs = [out for out in outputs if not is_stdio(out)]
    folders = {str(p) for out in outputs for p in Path(os.path.realpath(out)).parents}
    if real in folders:
        raise UsageError(
            f"--json {report} is a folder this run writes into; give a file name for the report"
        )
    for src in inputs:
        if not is_stdio(src) and os.path.realpath(src) == real:
            raise UsageError(
                f"--json {report} is an input of this run; refusing to replace it with the "
                "report (choose another file name)"
            )
    for out in outputs:
        if not is_stdio(out) and os.path.realpath(out) == real:
            raise UsageError(
                f"--json {report} is also an output of this run; choose another file name"
            )
    if report.exists() and is_image_path(Path(report.name)):
        raise UsageError(
            f"--json {report} is an existing image; refusing to replace it with the report "
            "(choose a .json file name)"
        )


def collect_inputs(source: Path, recursive: bool = False) -> list[tuple[Path, Path]]:
    """(file, path relative to INPUT) for a file or every image in a folder."""
    if is_stdio(source):
        return [(Path(STDIO), Path(STDIN_NAME))]
    source = Path(source)
    if source.is_dir():
        return [(p, p.relative_to(source)) for p in find_images(source, recursive)]
    return [(source, Path(source.name))]


def check_paths(source: Path, output: Path | None, recursive: bool) -> None:
    """Refuse OUTPUT equal to INPUT, and OUTPUT inside INPUT when outputs would be re-read."""
    if output is None:
        return
    if is_stdio(source) or is_stdio(output):
        if is_stdio(output) and Path(source).is_dir():
            raise UsageError("OUTPUT - (standard output) takes one image, but INPUT is a folder")
        return
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if src == out:
        raise UsageError(
            "OUTPUT is the same as INPUT; choose another OUTPUT (inputs are never overwritten)"
        )
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise UsageError(
                f"INPUT is a folder, so OUTPUT must be a folder, but {output} is a file"
            )
        if recursive and src in out.parents:
            raise UsageError(
                "OUTPUT is inside INPUT and --recursive would read the outputs as inputs; "
                "choose an OUTPUT outside INPUT"
            )


def output_target(
    source: Path, output: Path, fmt: str | None
) -> tuple[Path | None, Path | None, str]:
    """(folder, file, format) for OUTPUT: a file only if INPUT is one and OUTPUT looks like one.

    ``-`` as OUTPUT is standard output (PNG unless ``fmt`` says otherwise); ``-``
    as INPUT needs OUTPUT to be a file name or ``-``.
    """
    if is_stdio(output):
        return None, Path(STDIO), fmt or "png"
    one_file = is_stdio(source) or source.is_file()
    looks_like_file = not output.is_dir() and is_image_path(Path(output.name))
    if is_stdio(source) and not looks_like_file:
        raise UsageError(
            "INPUT - (standard input) is one image: OUTPUT must be a file name "
            "(with an image suffix) or - (standard output)"
        )
    if one_file and not looks_like_file and not output.exists() and output.suffix:
        raise UsageError(
            f"OUTPUT {output}: {output.suffix} is not an image format carcli writes (.png, .webp, "
            f".jpg); give an image file name, or create the folder {output} first to write into it"
        )
    if one_file and looks_like_file:
        try:
            implied = format_for_suffix(output.suffix)
        except ImageWriteError as exc:
            raise UsageError(str(exc)) from None
        if fmt is not None and fmt != implied:
            raise UsageError(f"--format {fmt} contradicts OUTPUT's suffix {output.suffix}")
        return None, output, implied
    return output, None, fmt or "png"
