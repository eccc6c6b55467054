"""The errors the library raises, and the checks that raise them (each written once).

Every error is an `MsrnnError`; the ones about a value a caller passed are also
`ValueError`s. Messages name the library's own parameters (``capacity``, ``sinks``,
``top_k``) so that they read the same from Python as from the command line, which maps
them to one line on stderr: `InvalidArgument` exits with status 2 (bad usage), every
other `MsrnnError` with status 1 (docs/design.md, "Errors").
"""

from __future__ import annotations

import math


class MsrnnError(Exception):
    """Anything the library refuses to do, in one line (command line: exit status 1).

    `param` names the argument at fault, if one is (e.g. "top_k"); the command line words
    the message with its own flag for it (``--top-k``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidArgument(MsrnnError, ValueError):
    """A value a caller passed is out of range or unknown (command line: exit status 2)."""


class UnsupportedConfigError(MsrnnError, ValueError):
    """A checkpoint asks for math this implementation does not do."""


class MsrnnWarning(UserWarning):
    """Something the library does anyway but a user should know (through `warnings`;
    the command line prints it as one line `msrnn: warning: ...`)."""


_WARNED: set[str] = set()


def warn(message: str) -> None:
    """Warn once per process (a sweep would otherwise repeat itself run after run)."""
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, MsrnnWarning, stacklevel=3)




def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int >= minimum, else InvalidArgument naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name} must be an integer, got {value!r}", name) from None
        if as_int != value:
            raise InvalidArgument(f"{name} must be an integer, got {value!r}", name)
        value = as_int
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}", name)
    return value


def check_float(name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open)."""
    try:
        v = float(value)
    except OverflowError:  # an integer beyond any float
        raise InvalidArgument(f"{name} must be a finite number, got one too large for a float", name) from None
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a number, got {value!r}", name) from None
    if not math.isfinite(v):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}", name)
    if low is not None and (v <= low if low_open else v < low):
        bound = f"> {low}" if low_open else f">= {low}"
        if high is not None:
            bound = f"in {'(' if low_open else '['}{low}, {high}]"
        raise InvalidArgument(f"{name} must be {bound}, got {value}", name)
    if high is not None and v > high:
        lo = "(" if low_open else "["
        raise InvalidArgument(f"{name} must be in {lo}{low}, {high}], got {value}", name)
    return v


def check_choice(name: str, value: str, choices, param: str | None = None) -> str:
    """`value` (case-insensitive) if it is one of `choices`, else InvalidArgument."""
    v = str(value).strip().lower()
    if v not in choices:
        raise InvalidArgument(f"unknown {name} {value!r} (choose from {', '.join(choices)})", param)
    return v
