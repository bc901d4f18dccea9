"""Argument checks shared by the routers: each error names the class, the argument, what was
expected and what was received."""

from __future__ import annotations

import math
import numbers
from typing import NoReturn


def is_int(v) -> bool:
    # numpy and torch integer scalars count; bool does not (True would be a silent 1).
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def bad(owner: str, arg: str, expected: str, got) -> NoReturn:
    raise ValueError(f"{owner}: {arg} must be {expected}, got {got!r}")


# bool is an int and a str is truthy in Python: every argument is checked for its type first, so
# d_model=True or renormalize="no" is an error, not a silent 1 or True.
def check_bools(owner: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, bool):
            bad(owner, name, "a bool", v)


def check_ints(owner: str, **values) -> None:
    for name, v in values.items():
        if not is_int(v):
            bad(owner, name, "an int", v)


def check_floats(owner: str, **values) -> None:
    for name, v in values.items():
        if not is_real(v):
            bad(owner, name, "a float", v)


def check_choice(owner: str, name: str, v, allowed: tuple) -> None:
    if not isinstance(v, str) or v not in allowed:
        bad(owner, name, f"one of {allowed}", v)


def check_non_negative(owner: str, **values) -> None:
    for name, v in values.items():
        if not (v >= 0 and math.isfinite(v)):
            bad(owner, name, "a finite float >= 0", v)


def check_positive(owner: str, **values) -> None:
    for name, v in values.items():
        if not (v > 0 and math.isfinite(v)):
            bad(owner, name, "a finite float > 0", v)
