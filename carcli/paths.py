"""Where a command reads and writes: INPUT files, and OUTPUT checked against INPUT."""

from __future__ import annotations

import os
from pathlib import Path

from carcli.errors import UsageError
from carcli.imageio import (
    ImageWriteError,
    find_images,
    format_for_suffix,
    is_image_path,
)


def collect_inputs(source: Path, recursive: bool = False) -> list[tuple[Path, Path]]:
    """(file, path relative to INPUT) for a file or every image in a folder."""
    source = Path(source)
    if source.is_dir():
        return [(p, p.relative_to(source)) for p in find_images(source, recursive)]
    return [(source, Path(source.name))]


def check_paths(source: Path, output: Path | None, recursive: bool) -> None:
    """Refuse OUTPUT equal to INPUT, and OUTPUT inside INPUT when outputs would be re-read."""
    if output is None:
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
    """(folder, file, format) for OUTPUT: a file only if INPUT is one and OUTPUT looks like one."""
    if source.is_file() and not output.is_dir() and is_image_path(Path(output.name)):
        try:
            implied = format_for_suffix(output.suffix)
        except ImageWriteError as exc:
            raise UsageError(str(exc)) from None
        if fmt is not None and fmt != implied:
            raise UsageError(f"--format {fmt} contradicts OUTPUT's suffix {output.suffix}")
        return None, output, implied
    return output, None, fmt or "png"
