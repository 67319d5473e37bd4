"""Checks of parameter values, shared by every config dataclass: each failure is one line naming the field."""

from __future__ import annotations

from typing import Any


class ParamsError(ValueError):
    """A params file that cannot be run; the message is one line and names the field."""


def positive(name: str, value: Any) -> None:
    """A positive integer (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamsError(f"{name}: {value!r} must be a positive integer")


def in_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    """A number in [low, high], or (low, high] when low_open."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ParamsError(f"{name}: {value!r} must be a number in {bracket}{low}, {high}]")


def choice(name: str, value: Any, accepted: tuple) -> None:
    """One of `accepted`."""
    if value not in accepted:
        raise ParamsError(f"{name}: {value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")
