"""Argument validation shared by every entry point.

One rule per kind of argument, so the same mistake gets the same error wherever it is made
(``lh.analyze``, ``lh.HessianOperator``, the estimators or ``HessianCallback``): a ``TypeError`` for a
value of the wrong type, a ``ValueError`` for a value of the right type that is not allowed. Every
message names the argument, shows what was passed and says what to pass instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch


def _with_fix(message: str, fix: str) -> str:
    return f"{message} {fix}" if fix else message


def check_bool(name: str, value: object) -> bool:
    """Check a ``True``/``False`` flag.

    Args:
        name: Argument name for the message.
        value: The value passed.

    Returns:
        ``value``.

    Raises:
        TypeError: If ``value`` is not a ``bool`` (``0``, ``None`` and strings are refused).

    Example:
        >>> check_bool("trace", True)
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_int(name: str, value: object, minimum: int | None = None, fix: str = "") -> int:
    """Check an integer argument (``bool`` is not an integer here).

    Args:
        name: Argument name for the message.
        value: The value passed.
        minimum: Smallest allowed value, or ``None`` for no bound.
        fix: Advice appended to the message.

    Returns:
        ``value`` as an ``int``.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value < minimum``.

    Example:
        >>> check_int("top_k", 3, 0)
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_with_fix(f"`{name}` must be an integer, got {value!r}.", fix))
    if minimum is not None and value < minimum:
        raise ValueError(_with_fix(f"`{name}` must be >= {minimum}, got {value}.", fix))
    return int(value)


def check_optional_int(name: str, value: object, minimum: int | None = None, fix: str = "") -> int | None:
    """:func:`check_int`, with ``None`` allowed (and returned as is).

    Example:
        >>> check_optional_int("every_n_steps", None, 1) is None
        True
    """
    return None if value is None else check_int(name, value, minimum, fix)


def check_positive_float(name: str, value: object, fix: str = "") -> float:
    """Check a positive, finite real number.

    Args:
        name: Argument name for the message.
        value: The value passed.
        fix: Advice appended to the message.

    Returns:
        ``value`` as a ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not positive and finite.

    Example:
        >>> check_positive_float("tol", 1e-4)
        0.0001
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_with_fix(f"`{name}` must be a number, got {value!r}.", fix))
    if not math.isfinite(value) or not value > 0:
        raise ValueError(_with_fix(f"`{name}` must be a positive finite number, got {value!r}.", fix))
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[Any], fix: str = "") -> Any:
    """Check that ``value`` is one of ``choices``.

    Args:
        name: Argument name for the message.
        value: The value passed.
        choices: The allowed values.
        fix: Advice appended to the message (default: the list of choices).

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.

    Example:
        >>> check_choice("mode", "eval", ("eval", "train"))
        'eval'
    """
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(
            _with_fix(f"`{name}={value!r}` is not supported.", fix or f"Use one of {tuple(choices)}.")
        )
    return value


def check_callable(name: str, value: object, usage: str) -> Callable[..., Any]:
    """Check that ``value`` is callable.

    Args:
        name: Argument name for the message.
        value: The value passed.
        usage: How it is called, e.g. ``"loss_fn(module, batch)"``.

    Returns:
        ``value``.

    Raises:
        TypeError: If ``value`` is not callable.

    Example:
        >>> check_callable("progress", print, "progress(done, planned)") is print
        True
    """
    if not callable(value):
        raise TypeError(f"`{name}` must be callable as {usage}, got {value!r}.")
    return value


def check_patterns(name: str, value: object) -> tuple[str, ...] | None:
    """Check glob pattern(s) on parameter names: ``None``, one string, or a non-empty list of strings.

    Args:
        name: Argument name for the message.
        value: The value passed.

    Returns:
        ``None``, or the patterns as a tuple.

    Raises:
        TypeError: If ``value`` is neither a string nor an iterable of strings.
        ValueError: If it is an empty list.

    Example:
        >>> check_patterns("params", "conv1.*")
        ('conv1.*',)
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, Mapping | bytes) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise TypeError(
            f"`{name}` must be a glob pattern or a list of glob patterns on parameter names "
            f"(e.g. {name}=['conv1.*', 'fc.weight']), got {value!r}."
        )
    if not items:
        raise ValueError(f"`{name}` is an empty list; pass None to select every parameter.")
    return tuple(items)


def check_dtype(name: str, value: object) -> torch.dtype | None:
    """Check a floating compute dtype: ``None``, a ``torch.dtype``, or its name (``"float64"``).

    Args:
        name: Argument name for the message.
        value: The value passed.

    Returns:
        The ``torch.dtype``, or ``None``.

    Raises:
        TypeError: If ``value`` is not a floating dtype or the name of one.

    Example:
        >>> check_dtype("dtype", "float64")
        torch.float64
    """
    if value is None:
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"`{name}` must be None (the parameters' dtype) or a floating dtype such as torch.float64 "
            f"or 'float64', got {value!r}."
        )
    return dtype
