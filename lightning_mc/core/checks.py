"""Argument checks shared by every layer: counts (positive or non-negative ints), fractions in ``(0, 1)``, strengths.

Each raises a ``ValueError`` whose message names the argument, the value received and what is valid, in one wording
for the whole package.

Example:
    >>> check_int("n_boot", 1000)
    >>> check_int("n_boot", 0)
    Traceback (most recent call last):
    ...
    ValueError: n_boot=0 must be a positive int.
    >>> check_fraction("ci", 95, optional=True, what="a coverage", hint=", e.g. 0.95")
    Traceback (most recent call last):
    ...
    ValueError: ci=95 must be None or a coverage in (0, 1), e.g. 0.95.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False, hint: str = "") -> None:
    """Raise a ``ValueError`` unless ``value`` is an int ``>= minimum`` (or ``None`` when ``optional``).

    Args:
        name: The argument's name, as the user writes it.
        value: What the user passed.
        minimum: ``1`` (a positive int) or ``0`` (a non-negative int).
        optional: Whether ``None`` is valid.
        hint: Added to the message after what is valid, e.g. ``" (number of consecutive checks)"``.

    Example:
        >>> check_int("dataloader_idx", -1, minimum=0)
        Traceback (most recent call last):
        ...
        ValueError: dataloader_idx=-1 must be a non-negative int.
    """
    if (optional and value is None) or (is_int(value) and value >= minimum):
        return
    kind = "a positive int" if minimum == 1 else ("a non-negative int" if minimum == 0 else f"an int >= {minimum}")
    raise ValueError(f"{name}={value!r} must be {kind}{' or None' if optional else ''}{hint}.")


def check_fraction(
    name: str, value: Any, *, optional: bool = False, what: str = "a number", hint: str = "", closed: bool = False
) -> None:
    """Raise a ``ValueError`` unless ``value`` is a number in ``(0, 1)`` (``[0, 1]`` when ``closed``).

    Args:
        name: The argument's name, as the user writes it.
        value: What the user passed.
        optional: Whether ``None`` is valid.
        what: What the number is, e.g. ``"a coverage"``.
        hint: Added to the message after the interval, e.g. ``", e.g. 0.95"``.
        closed: Whether 0 and 1 are valid.

    Example:
        >>> check_fraction("min_share", 0.1)
    """
    if optional and value is None:
        return
    if is_number(value) and (0 <= value <= 1 if closed else 0 < value < 1):
        return
    interval = "[0, 1]" if closed else "(0, 1)"
    raise ValueError(f"{name}={value!r} must be {'None or ' if optional else ''}{what} in {interval}{hint}.")


def check_positive(name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is a positive, finite number (a strength, a scale).

    Example:
        >>> check_positive("alpha", 0.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha=0.0 must be a positive, finite number.
    """
    if not (is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{name}={value!r} must be a positive, finite number.")
