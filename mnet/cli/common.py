"""What every subcommand shares: exit codes, the one-line usage error, argument types, loading a user's network."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax

from mnet.core.protocol import is_layer

EXIT_DISAGREE = 1

EXIT_ERROR = 2

EXIT_INTERNAL = 3


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr and exit status 2, without the usage block."""

    def error(self, message: str):
        raise UsageError(message)


def _number(convert: Callable[[str], Any], accepts: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then refuse a value outside ``accepts`` as ``expected {wanted}``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda value: value > 0, "a positive integer")
non_negative_int = _number(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _number(float, lambda value: 0 < value < math.inf, "a positive number")
non_negative_float = _number(float, lambda value: 0 <= value < math.inf, "a number >= 0")


def widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 64,128,10, got {text!r}"
        ) from None
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 64,128,10, got {text!r}")
    return widths


def hidden_widths(text: str) -> list[int]:
    return [] if text.strip() in ("", "none") else widths(text)


def shape(text: str) -> tuple[int, ...]:
    """``8,8,1`` -> ``(8, 8, 1)``: one example's shape, without the batch axis."""
    return tuple(widths(text))


def set_dtype(dtype: str) -> None:

    jax.config.update("jax_enable_x64", dtype == "float64")


BUILT_IN_MODELS = ("mlp", "cnn", "transformer")


def load_object(spec: str):
    """The object named ``MODULE:ATTR`` (``ATTR`` may be dotted), importing ``MODULE`` with the current directory on
    the path, as ``python -m`` has it. A missing module or attribute is a :class:`UsageError`."""

    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(
            f"--model {spec!r}: expected one of {', '.join(BUILT_IN_MODELS)} or MODULE:ATTR (e.g. my_models:net)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # a user's module may fail in any way while importing
        raise UsageError(
            f"--model {spec!r}: cannot import module {module_name!r} ({type(error).__name__}: {error})"
        ) from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise UsageError(f"--model {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    return target


def user_network(spec: str):
    """``MODULE:ATTR`` naming a layer, or a function of no arguments that returns one."""

    candidate = load_object(spec)
    if not is_layer(candidate) and callable(candidate):
        try:
            candidate = candidate()
        except TypeError as error:
            raise UsageError(f"--model {spec!r}: calling it with no arguments failed ({error})") from None
    if not is_layer(candidate):
        raise UsageError(
            f"--model {spec!r} is {type(candidate).__name__} {candidate!r:.80}, not a layer "
            "(an object with init, forward and backward, or a function of no arguments returning one)"
        )
    return candidate
