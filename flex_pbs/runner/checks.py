"""Checks of run values, with messages that start with the offending key."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid run configuration; the message starts with the offending key."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def positive_int(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{key} must be > 0, got {value!r}")


def non_negative_int(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{key} must be >= 0, got {value!r}")
