"""Checks of the arguments every public function and command takes (arrays are `checks.py`'s): each
refuses a bad value at the call, in one line naming the parameter, what was given and what is expected,
so a wrong argument never gets as far as an IndexError in a run or a plausible but wrong answer.

`bool` is an `int` in Python: the integer and number checks refuse it (threads=True is a mistake, not 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import numpy as np

from edgeflex.errors import UsageError


def shown(value: Any) -> str:
    """`value` as an error message shows it: its repr, cut to 60 characters, with its type when the repr
    alone would hide it ('2' the string vs 2 the number)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if type(value) in (bool, int, float, str, list, tuple, dict, type(None)):
        return text
    return f"{text} ({type(value).__name__})"


def fail(name: str, value: Any, expected: str, fix: str = "") -> NoReturn:
    """Raise UsageError `name=value: expected ...; fix`. Its `expected` attribute holds the part after the
    name and value, for a caller that names them its own way (the command line: `--batch -1`)."""
    tail = f"{expected}; {fix}" if fix else expected
    err = UsageError(f"{name}={shown(value)}: expected {tail}")
    err.expected = tail
    raise err


def is_int(value: Any) -> bool:
    """A whole number, not a bool (numpy's integers too)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """An int or a float (numpy's too), not a bool; may be nan or inf."""
    return is_int(value) or isinstance(value, (float, np.floating))


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              none: bool = False) -> int | None:
    """`value` as an int in [lo, hi] (None allowed when `none`)."""
    if value is None and none:
        return None
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(name, value, _int_range(lo, hi) + (" or None" if none else ""))
    return int(value)


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"a whole number in {lo}..{hi}"
    if lo is not None:
        return f"a whole number >= {lo}"
    return "a whole number" + (f" <= {hi}" if hi is not None else "")


def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = True, none: bool = False) -> float | None:
    """`value` as a finite float above `lo` (or at it, with `lo_open=False`) and at most `hi`."""
    if value is None and none:
        return None
    ok = is_real(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        if lo is not None and hi is not None:
            want = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            want = "a finite number" + (f" <= {hi:g}" if hi is not None else "")
        fail(name, value, want + (" or None" if none else ""))
    return float(value)


def check_share(name: str, value: Any, *, none: bool = False) -> float | None:
    """A share or margin: a finite number in (0, 1]."""
    return check_real(name, value, 0, 1, none=none)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(name, value, "True or False")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices` (compared by type too: 1 is not True, 1.0 is not 'auto')."""
    if not any(type(value) is type(c) and value == c for c in choices):
        fail(name, value, "one of " + ", ".join(map(repr, choices)))
    return value


def check_str(name: str, value: Any, *, none: bool = False) -> str | None:
    if value is None and none:
        return None
    if not isinstance(value, str) or not value:
        fail(name, value, "a non-empty string" + (" or None" if none else ""))
    return value


def check_names(name: str, value: Any, known: Iterable[str] | None = None) -> list[str]:
    """A non-empty list (or tuple) of distinct names, each one of `known` where given."""
    if not isinstance(value, (list, tuple)) or not value:
        fail(name, value, "a non-empty list of names")
    for v in value:
        if not isinstance(v, str):
            fail(name, value, "a list of names (strings), got a " + type(v).__name__)
    dup = sorted({v for v in value if value.count(v) > 1})
    if dup:
        fail(name, value, "distinct names", f"{', '.join(map(repr, dup))} given more than once")
    if known is not None:
        known = list(known)
        unknown = [v for v in value if v not in known]
        if unknown:
            fail(name, value, "names from: " + ", ".join(known), f"unknown: {', '.join(map(repr, unknown))}")
    return list(value)


def check_path(name: str, value: Any) -> str | os.PathLike:
    """A path: a non-empty str or an os.PathLike."""
    if not (isinstance(value, os.PathLike) or (isinstance(value, str) and value)):
        fail(name, value, "a path (str or os.PathLike)")
    return value
