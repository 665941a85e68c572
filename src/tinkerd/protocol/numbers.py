"""Numbers from JSON bodies, checked before anything uses them: integers that fit the int64 the Store and
torch hold, finite floats, each within a stated range. Errors name the field (`BadRequest`, a 400).

JSON gives Python ints of any size, floats that may be NaN or infinite (sloppy encoders write `NaN` and
`Infinity`), strings and booleans where numbers belong. Integral floats (`7.0`) count as integers, as
pydantic's lax mode has it; booleans never count as numbers. Knows nothing about what the fields mean.
"""

from __future__ import annotations

import math

from tinkerd.protocol.types import BadRequest

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MAX = (1 << 31) - 1


def _range(lo, hi) -> str:
    return f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"


def bounded_setting(value, kind: type, low: float, high: float, field: str, error: type = BadRequest):
    """A user-set number (an int or float `kind` in [low, high]) as that kind; else `error` naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise error(f"{field}: expected {kind.__name__}, got {value!r}")
    if not low <= value <= high:
        raise error(f"{field}: {value} is outside [{low:g}, {high:g}]")
    return kind(value)


def as_int(value, field: str, lo: int | None = INT64_MIN, hi: int | None = INT64_MAX) -> int:
    """`value` as an int in [lo, hi] (None: unbounded on that side, still within int64)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field}: expected an integer, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRequest(f"{field}: expected an integer, got {value!r}")
        value = int(value)
    low = INT64_MIN if lo is None else lo
    high = INT64_MAX if hi is None else hi
    if not low <= value <= high:
        raise BadRequest(f"{field} must be in {_range(lo, hi)}, got {value}")
    return value


def as_float(value, field: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (`lo_open`: (lo, hi])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field}: expected a number, got {type(value).__name__} {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise BadRequest(f"{field}: {value} is too large") from None
    if not math.isfinite(number):
        raise BadRequest(f"{field} must be a finite number, got {number}")
    if (lo is not None and (number <= lo if lo_open else number < lo)) or (hi is not None and number > hi):
        bracket = "(" if lo_open else "["
        raise BadRequest(f"{field} must be in {bracket}{_range(lo, hi)[1:]}, got {number}")
    return number


def int_list(values, field: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> list[int]:
    """A JSON list of integers (token ids, say), each in [lo, hi]."""
    if not isinstance(values, list):
        raise BadRequest(f"{field}: expected a list of integers, got {type(values).__name__}")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise BadRequest(f"{field}[{i}]: expected an integer in [{lo}, {hi}], got {_short(value)}")
        out.append(value)
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
