"""Argument types shared by the command lines (argparse turns their errors into usage messages)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(text: str, convert: Callable[[str], float], kind: str, valid: Callable[[float], bool], want: str) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, "a positive integer", lambda v: v >= 1, "a positive integer"))


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0, "a positive number")


def non_negative_int(text: str) -> int:
    return int(_number(text, int, "a whole number", lambda v: v >= 0, "zero or more"))
