"""Checks of run values, with messages that start with the offending key, and how the console
scripts report a user's mistake: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

USAGE_ERROR = 2  # the exit status of a user's mistake (argparse's convention)


class ConfigError(ValueError):
    """An invalid run configuration; the message starts with the offending key."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def positive_int(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{key} must be > 0, got {value!r}")


def non_negative_int(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{key} must be >= 0, got {value!r}")


def device_problems(device: str, key: str = "device") -> None:
    """Raise :class:`ConfigError` for an unknown or unavailable device."""
    require(re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None, f"{key} must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), f"{key}={device} but torch.cuda.is_available() is False")


def one_line(message: object) -> str:
    """A message on one line (the lines of a multi-line message joined by spaces)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(prog: str, message: object) -> NoReturn:
    """Report a user's mistake as console scripts do: ``prog: message`` on one stderr line, exit 2."""
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: {one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(USAGE_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (``prog: error: ...``, exit 2), not
    the usage block and the error."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"error: {message} (see {self.prog} --help)")
