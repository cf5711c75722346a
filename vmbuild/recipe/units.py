"""Sizes and durations: the text forms (parse_size, format_size, parse_duration) and the
recipe value types built on them."""

from __future__ import annotations

import re
from decimal import Decimal

from vmbuild.recipe.values import _str, _Type
from vmbuild.recipe.yamlnodes import _fail, _kind, _Node, _show

# Sizes ---------------------------------------------------------------------------------------

_SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?( ?([KkMmGgTt]([Ii]?[Bb])?|[Bb]))?$"
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgt", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter + "ib"] = 1024**_i
    _SIZE_UNITS[_letter + "b"] = 1000**_i
_SIZE_HINT = "use 512MiB, 4GiB, 2G"


def parse_size(text: str) -> int:
    """Bytes from "512MiB", "4GiB", "2G", "1024M", "10KiB", "1.5GB" or "4096".

    KiB/MiB/GiB/TiB and the single letters K/M/G/T (as qemu-img reads them) are powers of
    1024; KB/MB/GB/TB are powers of 1000. Case is not significant. Raises ValueError.
    """
    text = text.strip()
    if not re.fullmatch(_SIZE_PATTERN, text):
        raise ValueError(f"{_show(text)} is not a size ({_SIZE_HINT})")
    number = re.match(r"[0-9.]+", text)
    assert number is not None
    unit = text[number.end():].strip().lower()
    return int(Decimal(number.group()) * _SIZE_UNITS[unit])


def format_size(size: int) -> str:
    """The shortest exact binary spelling of a size: 4294967296 -> "4GiB"."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _size(minimum: int) -> _Type:
    def parse(node: _Node, field_: str) -> int:
        value = node.scalar
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str):
            try:
                size = parse_size(_str(node, field_))
            except ValueError as exc:
                _fail(node.loc, field_, str(exc))
        else:
            _fail(node.loc, field_, f"expected a size such as 4GiB, got {_kind(node)}")
        if size < minimum:
            _fail(node.loc, field_,
                  f"{_show(value)} is below the minimum of {format_size(minimum)}")
        return size

    return _Type("size", parse, {
        "type": ["string", "integer"], "pattern": _SIZE_PATTERN, "minimum": minimum,
    })


# Durations -----------------------------------------------------------------------------------

_NUM = r"[0-9]+(\.[0-9]+)?"
_DURATION_PATTERN = rf"^{_NUM}( ?[smhd]( ?{_NUM} ?[smhd])*)?$"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_HINT = "use 90s, 30m, 2h"


def parse_duration(text: str) -> float:
    """Seconds from "90s", "30m", "2h", "1d", "1h30m" or a plain number of seconds.

    Raises ValueError.
    """
    text = text.strip()
    if not re.fullmatch(_DURATION_PATTERN, text):
        raise ValueError(f"{_show(text)} is not a duration ({_DURATION_HINT})")
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?) ?([smhd])", text)
    if not parts:
        return float(text)
    return float(sum(Decimal(n) * _DURATION_UNITS[u] for n, u in parts))


def format_duration(seconds: float) -> str:
    """The spelling a recipe would use: 600 -> "10m", 5400 -> "1h30m", 2.5 -> "2.5s"."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    parts = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= factor:
            parts.append(f"{whole // factor}{unit}")
            whole %= factor
    return "".join(parts)


def _parse_duration_node(node: _Node, field_: str) -> float:
    value = node.scalar
    if isinstance(value, int | float) and not isinstance(value, bool):
        if ":" in node.raw:  # YAML 1.1 reads 1:30 as base-60 (90): say what we would assume
            _fail(node.loc, field_, f"{node.raw} is ambiguous ({_DURATION_HINT}, or 1h30m)")
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(_str(node, field_))
        except ValueError as exc:
            _fail(node.loc, field_, str(exc))
    else:
        _fail(node.loc, field_, f"expected a duration such as 2h, got {_kind(node)}")
    if not 0 < seconds < float("inf"):
        _fail(node.loc, field_, f"{_show(value)} must be a positive duration")
    return seconds


_DURATION = _Type("duration", _parse_duration_node, {
    "type": ["string", "number"], "pattern": _DURATION_PATTERN, "exclusiveMinimum": 0,
})
