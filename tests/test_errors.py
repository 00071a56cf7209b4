"""One error convention: messages name parameters, the CLI shows flags, usage errors exit 2."""

from __future__ import annotations

from pathlib import Path

from conftest import photo
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app
from carcli.errors import (
    EXIT_USAGE,
    ConfigError,
    UsageError,
    ValidationError,
    WeightsWriteError,
    param,
)


def test_messages_name_parameters_and_the_cli_shows_flags() -> None:
    exc = UsageError(f"give {param('steps')} or {param('time_budget')} (in {{braces}}.png)")
    assert str(exc) == "give steps or time_budget (in {braces}.png)"
    assert exc.cli_message() == "give --steps or --time-budget (in {braces}.png)"
    config = ConfigError("min_lr", f"must be between 0 and {param('lr')}")
    assert str(config) == "min_lr must be between 0 and lr" and config.option == "--min-lr"
    assert config.cli_message() == "--min-lr must be between 0 and --lr"
    assert (exc.exit_code, WeightsWriteError("x").exit_code, ValidationError("x").exit_code) == (
        EXIT_USAGE,
        1,
        1,
    )


def test_every_command_exits_2_on_a_usage_error(tmp_path: Path, tiny_weights: Path) -> None:
    """Image commands, train, export and average: one line naming the flag, exit code 2."""
    image = tmp_path / "a.png"
    Image.fromarray(photo(20, 24)).save(image)
    invoke = CliRunner().invoke
    cases = [
        (["roundtrip", str(image), "-w", str(tiny_weights), "--precision", "fp16", "-d", "cpu"],
         "error: --precision fp16 needs a CUDA device"),
        (["train", "--run", str(tmp_path / "run"), "--steps", "1"],
         "error: a new run needs --data and --val"),
        (["train", "--run", str(tmp_path / "run"), "--resume"], "nothing to resume"),
        (["export", str(tmp_path / "no-run"), str(tmp_path / "x.safetensors")],
         "not a run folder"),
        (["average", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"),
          "-o", str(tmp_path / "avg.safetensors")], "is given twice"),
    ]  # fmt: skip
    for args, message in cases:
        result = invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
