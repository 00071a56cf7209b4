"""Every error a user can cause, its exit code, and how its message names a parameter.

A message is one line. Where it names a parameter it uses :func:`param`, so
the library shows the parameter's name (``precision``) and the command line
its flag (``--precision``, :meth:`CarError.cli_message`). Exit codes, for
every command: 0 all done, 1 something failed, 2 a usage error (the request
itself cannot work), 130 interrupted (Ctrl-C), 128 + N ended by signal N
(SIGTERM 143, SIGHUP 129). No heavy imports: the command line
reports usage errors before torch loads.
"""

from __future__ import annotations

import re
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_MARK = "\x00"  # cannot occur in a path or any other text a user passes
_NAMED = re.compile(f"{_MARK}([A-Za-z0-9_]+){_MARK}")


def param(name: str) -> str:
    """``name`` (a keyword parameter or TrainConfig field) marked for use in a message."""
    return f"{_MARK}{name}{_MARK}"


def as_flag(name: str) -> str:
    """The command-line flag of a parameter: ``time_budget`` -> ``--time-budget``."""
    return "--" + name.replace("_", "-")


def render(text: str, name_of: Callable[[str], str] = str) -> str:
    """``text`` with each :func:`param` replaced by ``name_of(name)``."""
    return _NAMED.sub(lambda m: name_of(m.group(1)), text)


class CarError(Exception):
    """An error the user can cause (not a bug); :attr:`exit_code` for the command line."""

    exit_code = EXIT_FAILED

    def __str__(self) -> str:
        return render(super().__str__())

    def cli_message(self) -> str:
        """The message with parameters shown as command-line flags."""
        return render(super().__str__(), as_flag)


class UsageError(CarError, ValueError):
    """Arguments that make no sense (together), or point at nothing usable: exit code 2."""

    exit_code = EXIT_USAGE


class PrecisionError(UsageError):
    """A precision this device cannot run."""


class ConfigError(UsageError):
    """A training setting out of range; ``name`` is the TrainConfig field."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{param(name)} {reason}")
        self.name, self.reason = name, reason

    @property
    def option(self) -> str:
        return as_flag(self.name)


class WeightsError(UsageError):
    """Weights that cannot be used (missing, damaged, another scale or network)."""


class NoWeightsInstalled(WeightsError):
    """No shipped weights for the requested scale: the user must name some."""


class WeightsWriteError(WeightsError):
    """A checkpoint that could not be written (disk full, read-only folder): exit code 1."""

    exit_code = EXIT_FAILED


class ValidationError(CarError, RuntimeError):
    """Validation could not measure the model."""


class ImageReadError(CarError):
    """A file that cannot be decoded (the batch reports it and carries on)."""


class ImageWriteError(CarError):
    """An image that cannot be encoded or written (the batch reports it and carries on)."""


class ProcessingError(CarError, RuntimeError):
    """One image cannot be processed, e.g. the network produced NaN (the batch carries on)."""
