"""Value parsers: each checks one kind of value and converts it, or fails with the node's line.

A `_Type` pairs a parser with its name (shown in docs/recipe.md, see reference.py) and its
JSON-Schema fragment, so the table in settings.py can describe every key with one object.
Sizes and durations are in units.py, paths inside the recipe's directory in paths.py.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vmbuild.recipe.model import RECIPE_VERSION
from vmbuild.recipe.yamlnodes import _fail, _kind, _Node, _show


@dataclass(frozen=True)
class _Type:
    """How one kind of value is checked (`parse`) and described (`name`, `schema`)."""

    name: str  # for the reference (reference.py): "string", "size", "list of strings", ...
    parse: Callable[[_Node, str], Any]
    schema: Mapping[str, Any]


def _str(node: _Node, field_: str, expected: str = "a string") -> str:
    """A string scalar. No recipe value may carry NUL or a lone surrogate: neither can pass
    through argv, a path or a file."""
    if not isinstance(node.scalar, str) or node.mapping is not None or node.items is not None:
        _fail(node.loc, field_, f"expected {expected}, got {_kind(node)}")
    if "\0" in node.scalar:
        _fail(node.loc, field_, "contains a NUL character, which no recipe value may carry")
    try:
        node.scalar.encode("utf-8")
    except UnicodeEncodeError as exc:  # a YAML escape such as "\ud800" makes one
        _fail(node.loc, field_,
              f"contains a lone surrogate (\\u{ord(node.scalar[exc.start]):04x}), which is not "
              "a character and cannot be written as UTF-8 into a path, an argument or a file")
    return node.scalar


def _regex_type(
    name: str, pattern: str, what: str, extra: Callable[[str], str | None] | None = None
) -> _Type:
    """A string that must match `pattern` (a regex valid in both Python and JSON Schema)."""

    def parse(node: _Node, field_: str) -> str:
        value = _str(node, field_)
        if not re.fullmatch(pattern, value):
            _fail(node.loc, field_, f"{_show(value)} is not {what}")
        problem = extra(value) if extra else None
        if problem:
            _fail(node.loc, field_, f"{_show(value)} {problem}")
        return value

    return _Type(name, parse, {"type": "string", "pattern": pattern})


_ANY_STRING = _Type("string", _str, {"type": "string"})


def _enum(values: tuple[str, ...], refusals: Mapping[str, str] | None = None) -> _Type:
    """One of a fixed set; `refusals` gives a better message for known-but-refused values."""

    def parse(node: _Node, field_: str) -> str:
        value = _str(node, field_)
        if value in values:
            return value
        if refusals and value in refusals:
            _fail(node.loc, field_, f"{_show(value)}: {refusals[value]}")
        close = difflib.get_close_matches(value, values, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _fail(node.loc, field_, f"{_show(value)} is not one of {', '.join(values)}{hint}")

    return _Type(" | ".join(values), parse, {"type": "string", "enum": list(values)})


def _int(low: int, high: int) -> _Type:
    def parse(node: _Node, field_: str) -> int:
        value = node.scalar
        if isinstance(value, bool) or not isinstance(value, int) or node.mapping or node.items:
            _fail(node.loc, field_, f"expected an integer, got {_kind(node)}")
        if not low <= value <= high:
            _fail(node.loc, field_, f"{value} is out of range ({low} to {high})")
        return value

    return _Type(f"integer {low}..{high}", parse,
                 {"type": "integer", "minimum": low, "maximum": high})


def _parse_bool(node: _Node, field_: str) -> bool:
    """Only YAML booleans: a quoted "true" is a string and most likely a mistake."""
    if not isinstance(node.scalar, bool):
        _fail(node.loc, field_, f"expected a boolean (true or false), got {_kind(node)}")
    return node.scalar


_BOOL = _Type("boolean", _parse_bool, {"type": "boolean"})


def _list_of(
    item: _Type, *, unique: bool = False, nonempty: bool = False, name: str | None = None
) -> _Type:
    """A YAML list. `unique` drops repeats (lists append across `extends:`, so they happen)."""

    def parse(node: _Node, field_: str) -> tuple[Any, ...]:
        if node.items is None:
            _fail(node.loc, field_, f"expected a list, got {_kind(node)}")
        if nonempty and not node.items:
            _fail(node.loc, field_, "must not be empty")
        values = [item.parse(n, f"{field_}[{i}]") for i, n in enumerate(node.items)]
        if unique:
            values = list(dict.fromkeys(values))
        return tuple(values)

    schema: dict[str, Any] = {"type": "array", "items": dict(item.schema)}
    if nonempty:
        schema["minItems"] = 1
    return _Type(name or f"list of {item.name}", parse, schema)


# Everything else -----------------------------------------------------------------------------

_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_PACKAGE_PATTERN = r"^[a-z0-9][a-z0-9+.-]+$"
_MODULE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_SUITE_PATTERN = r"^[a-z][a-z0-9-]*$"
_HOSTNAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
_TIMEZONE_PATTERN = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"
_USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
_OWNER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?$"
_MODE_PATTERN = r"^0?[0-7]{3,4}$"
_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_GUEST_OS_PATTERN = r"^[A-Za-z0-9-]+$"
_EXTENDS_NAME_PATTERN = r"^[a-z0-9][a-z0-9.-]*$"
_URL_PATTERN = r"^https?://[^\s]+$"


def _parse_version(node: _Node, field_: str) -> int:
    value = node.scalar
    if isinstance(value, bool) or not isinstance(value, int) or node.mapping or node.items:
        _fail(node.loc, field_, f"expected the integer {RECIPE_VERSION}, got {_kind(node)}")
    if value != RECIPE_VERSION:
        _fail(node.loc, field_,
              f"version {value} is not supported: this vmbuild reads recipe version "
              f"{RECIPE_VERSION} (see docs/recipe.md)")
    return value


def _check_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http:// or https:// URL with a host name"
    return None


def _parse_mode(node: _Node, field_: str) -> str:
    """An octal mode string, normalized to four digits ("755" -> "0755").

    An unquoted mode is refused: YAML 1.1 reads 0755 as the integer 493 and 755 as seven
    hundred and fifty-five, and guessing which one was meant is how files get wrong modes.
    """
    if isinstance(node.scalar, int) and not isinstance(node.scalar, bool):
        digits = re.sub(r"^0o?", "", node.raw)
        quoted = f'"{digits.zfill(4)}"' if re.fullmatch(r"[0-7]{3,4}", digits) else '"0755"'
        _fail(node.loc, field_,
              f"{node.raw} must be a quoted string such as {quoted}: unquoted, YAML reads it "
              "as an integer")
    value = _str(node, field_)
    if not re.fullmatch(_MODE_PATTERN, value):
        _fail(node.loc, field_, f'{_show(value)} is not an octal mode such as "0755"')
    return f"{int(value, 8):04o}"


def _parse_command(node: _Node, field_: str) -> tuple[str, ...]:
    """argv as a list (no shell), or one string that is run by /bin/sh -c, kept verbatim."""
    expected = "a list of strings (argv) or a string (a shell command)"
    if node.items is not None:
        if not node.items:
            _fail(node.loc, field_, "is empty; give the program and its arguments")
        argv = tuple(_str(n, f"{field_}[{i}]") for i, n in enumerate(node.items))
        program = argv[0]
        if not program.strip() or ("/" in program and not program.startswith("/")):
            _fail(node.items[0].loc, f"{field_}[0]",
                  f"{_show(program)}: the program must be an absolute path or a bare name "
                  "looked up in PATH")
        return argv
    command = _str(node, field_, expected)
    if not command.strip():
        _fail(node.loc, field_, "is empty")
    return ("/bin/sh", "-c", command)


def _parse_environment(node: _Node, field_: str) -> dict[str, str]:
    """Variables for the job. Numbers are taken as written (PORT: 0755 stays "0755")."""
    if node.mapping is None:
        _fail(node.loc, field_, f"expected a mapping of NAME: value, got {_kind(node)}")
    env: dict[str, str] = {}
    for key, (key_loc, value) in node.mapping.items():
        where = f"{field_}.{key}"
        if not re.fullmatch(_ENV_NAME_PATTERN, key):
            _fail(key_loc, where, f"{_show(key)} is not a valid variable name")
        if isinstance(value.scalar, int | float) and not isinstance(value.scalar, bool):
            env[key] = value.raw
        else:
            env[key] = _str(value, where, "a string or a number")
    return env


def _parse_regex(node: _Node, field_: str) -> str:
    """A Python regular expression, kept as its source but compiled here: a typo in a pattern
    must fail `vmbuild check`, not the validation boot at the end of a long build."""
    value = _str(node, field_)
    try:
        re.compile(value)
    except re.error as exc:
        _fail(node.loc, field_, f"{_show(value)} is not a valid Python regular expression: {exc}")
    return value


_REGEX = _Type("regular expression", _parse_regex, {"type": "string", "format": "regex"})

_FORMAT = _enum(("vmx",), {"ova": "not supported yet (only vmx)"})


_EXTENDS = _Type("recipe name or path", _str, {"type": "string"})
