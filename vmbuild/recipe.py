"""The recipe model (RECIPE.md, version 1): load YAML, validate, apply defaults and `extends:`.

Everything a recipe may say is listed once, in `SETTINGS` (mkosi style): each row names the
section and key, the parser that checks and converts the value, the default, a description and
the JSON-Schema fragment. Parsing, defaults, `recipe_schema()` (what `vmbuild schema` prints) and
`settings_doc()` are all driven by that one table, so they cannot drift apart.

Values keep the file and line they were written on (the YAML is composed into nodes, not
loaded into plain dicts) because every error must say `file:line: field: message`: a typo in
a recipe is found by a person reading that line, never by reading a traceback.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import urlsplit

import yaml

from vmbuild.errors import RecipeError

__all__ = [
    "SETTINGS",
    "Application",
    "FileSpec",
    "Guest",
    "Job",
    "Output",
    "Recipe",
    "Setting",
    "format_size",
    "load_recipe",
    "parse_duration",
    "parse_size",
    "recipe_schema",
    "recipe_to_dict",
    "recipes_dir",
    "settings_doc",
]

RECIPE_VERSION = 1

@dataclass(frozen=True)
class FileSpec:
    """One `application.files` entry, with its source resolved inside the recipe directory."""

    src: str  # as written in the recipe
    src_path: Path  # resolved absolute path, guaranteed inside the recipe directory
    contents: bool  # True when src ends with "/": copy the directory's contents, not itself
    dest: str  # absolute guest path
    mode: str | None = None  # octal string such as "0755"
    owner: str | None = None


@dataclass(frozen=True)
class Guest:
    release: str = "bookworm"
    arch: str = "amd64"
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    disk: int = 4 * 1024**3  # bytes
    memory: int = 512 * 1024**2  # bytes
    cpus: int = 1
    firmware: str = "bios"  # bios | efi
    hostname: str = ""  # "" until defaulted to the recipe name
    timezone: str = "UTC"
    ssh: bool = False  # keep sshd enabled in the shipped image (no keys are left in it either way)


@dataclass(frozen=True)
class Application:
    files: tuple[FileSpec, ...] = ()
    run: tuple[str, ...] = ()
    playbook: Path | None = None  # resolved absolute path inside the recipe directory


@dataclass(frozen=True)
class Job:
    command: tuple[str, ...]  # argv; a string in the recipe becomes ("/bin/sh", "-c", string)
    workdir: str = "/"
    user: str = "root"
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds
    network: bool = False
    outputs: str | None = None  # absolute guest directory returned to the host


@dataclass(frozen=True)
class Output:
    hardware_version: int = 19
    guest_os: str = "debian12-64"
    disk_controller: str = "pvscsi"  # pvscsi | lsilogic | sata | nvme
    nic: str = "vmxnet3"  # vmxnet3 | e1000e | e1000
    vmdk: str = "monolithicSparse"  # monolithicSparse | streamOptimized
    formats: tuple[str, ...] = ("vmx",)


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe file, absolute
    name: str
    guest: Guest
    application: Application
    job: Job
    output: Output
    version: int = 1
    sources: tuple[Path, ...] = ()  # every file read, extends chain included, for hashing

    @property
    def directory(self) -> Path:
        return self.path.parent


# --------------------------------------------------------------------------------------------
# Located values: the YAML tree with file and line kept on every node
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loc:
    """Where a value was written: shown in errors, and the base for the relative paths in it."""

    file: str  # as shown to the user (the path they passed, or derived from it)
    line: int | None
    dir: Path  # resolved directory of that file: relative paths start here and may not leave it


@dataclass
class _Node:
    """One YAML value. Exactly one of `mapping`/`items` is set for containers; else a scalar."""

    loc: _Loc
    mapping: dict[str, tuple[_Loc, _Node]] | None = None  # key -> (where the key is, value)
    items: list[_Node] | None = None
    scalar: object = None  # str, int, float, bool, None, date, bytes (as YAML typed it)
    raw: str = ""  # the scalar's text as written, e.g. "0755" for an int that YAML read as 493

    @property
    def is_null(self) -> bool:
        return self.mapping is None and self.items is None and self.scalar is None


def _fail(loc: _Loc, field_: str | None, message: str) -> NoReturn:
    raise RecipeError(loc.file, loc.line, field_ or None, message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: object) -> str:
    """A value as it appears in a message: JSON-quoted strings, so an error stays one line."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(node: _Node) -> str:
    """The YAML type of a node, in words, for 'expected X, got Y' messages."""
    if node.mapping is not None:
        return "a mapping"
    if node.items is not None:
        return "a list"
    value = node.scalar
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


_MAX_NODES = 100_000  # alias expansion included: a "billion laughs" recipe stops here
_TAG = "tag:yaml.org,2002:"


class _Converter:
    """Turns a composed yaml.Node tree into `_Node`s, refusing what a recipe must not contain.

    The composer (not `yaml.safe_load`) is used because loaded dicts lose line numbers and
    silently keep the last of two duplicate keys.
    """

    def __init__(self, loader: yaml.SafeLoader, file: str, directory: Path) -> None:
        self.loader = loader
        self.file = file
        self.dir = directory
        self.count = 0
        self.active: set[int] = set()

    def loc(self, ynode: yaml.Node) -> _Loc:
        return _Loc(self.file, ynode.start_mark.line + 1, self.dir)

    def convert(self, ynode: yaml.Node, path: str) -> _Node:
        loc = self.loc(ynode)
        self.count += 1
        if self.count > _MAX_NODES:
            _fail(loc, None, f"the recipe is too large (over {_MAX_NODES} YAML values)")
        if isinstance(ynode, yaml.ScalarNode):
            value: object = self.loader.construct_object(ynode)
            return _Node(loc, scalar=value, raw=str(ynode.value))
        if id(ynode) in self.active:
            _fail(loc, path, "a YAML alias refers to itself")
        self.active.add(id(ynode))
        try:
            if isinstance(ynode, yaml.SequenceNode):
                if ynode.tag != _TAG + "seq":
                    _fail(loc, path, f"unsupported YAML tag {ynode.tag}")
                items = [self.convert(c, f"{path}[{i}]") for i, c in enumerate(ynode.value)]
                return _Node(loc, items=items)
            assert isinstance(ynode, yaml.MappingNode)
            if ynode.tag != _TAG + "map":
                _fail(loc, path, f"unsupported YAML tag {ynode.tag}")
            return self.mapping(ynode, path, loc)
        finally:
            self.active.discard(id(ynode))

    def mapping(self, ynode: yaml.MappingNode, path: str, loc: _Loc) -> _Node:
        first_seen: dict[str, int | None] = {}
        for key_node, _ in ynode.value:
            if key_node.tag == _TAG + "merge":  # `<<: *anchor` is resolved by flatten_mapping
                continue
            key = self.key(key_node, path)
            if key in first_seen:
                _fail(
                    self.loc(key_node),
                    _join(path, key),
                    f"duplicate key (first given on line {first_seen[key]})",
                )
            first_seen[key] = self.loc(key_node).line
        self.loader.flatten_mapping(ynode)
        out: dict[str, tuple[_Loc, _Node]] = {}
        for key_node, value_node in ynode.value:
            key = self.key(key_node, path)
            out[key] = (self.loc(key_node), self.convert(value_node, _join(path, key)))
        return _Node(loc, mapping=out)

    def key(self, key_node: yaml.Node, path: str) -> str:
        loc = self.loc(key_node)
        if not isinstance(key_node, yaml.ScalarNode):
            _fail(loc, path, "a key must be a plain string, not a list or a mapping")
        value: object = self.loader.construct_object(key_node)
        if not isinstance(value, str):
            got = _kind(_Node(loc, scalar=value))
            _fail(loc, _join(path, str(key_node.value)),
                  f"a key must be a string, got {got} (quote it: \"{key_node.value}\")")
        if "\0" in value:
            _fail(loc, path, "a key contains a NUL character")
        return value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _compose(text: str, file: str, directory: Path) -> _Node | None:
    """Parse one YAML document into located nodes; any YAML problem becomes a RecipeError."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # this already rejects unprintable characters
        root = loader.get_single_node()
        if root is None:
            return None
        return _Converter(loader, file, directory).convert(root, "")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = _one_line(exc.problem or "")
        context = _one_line(exc.context or "")
        if problem.startswith("but "):  # "expected a single document ... but found another"
            message = f"{context} {problem}"
        else:
            message = problem or context or "invalid YAML"
            if problem and context and exc.context_mark is not None:
                message += f" ({context} on line {exc.context_mark.line + 1})"
        # an error at the end of the stream is reported on the last line, not one past it
        line = min(mark.line + 1, max(len(text.splitlines()), 1)) if mark is not None else None
        raise RecipeError(file, line, None, f"YAML syntax error: {message}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, C0 controls)
        position = exc.position if isinstance(exc.position, int) else 0
        character = exc.character
        char = character if isinstance(character, int) else ord(str(character)[:1] or "?")
        line = text.count("\n", 0, position) + 1
        reason = _one_line(str(exc.reason))
        raise RecipeError(
            file, line, None, f"YAML syntax error: {reason} (character #x{char:04x})"
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(file, None, None, f"YAML syntax error: {_one_line(str(exc))}") from None
    except RecursionError:
        raise RecipeError(file, None, None, "YAML syntax error: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


# --------------------------------------------------------------------------------------------
# Value parsers: each checks one kind of value and converts it, or fails with the node's line
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Type:
    """How one kind of value is checked (`parse`) and described (`name`, `schema`)."""

    name: str  # for settings_doc(): "string", "size", "list of strings", ...
    parse: Callable[[_Node, str], Any]
    schema: Mapping[str, Any]


def _str(node: _Node, field_: str, expected: str = "a string") -> str:
    """A string scalar. No recipe value may carry NUL: it cannot pass through argv or files."""
    if not isinstance(node.scalar, str) or node.mapping is not None or node.items is not None:
        _fail(node.loc, field_, f"expected {expected}, got {_kind(node)}")
    if "\0" in node.scalar:
        _fail(node.loc, field_, "contains a NUL character, which no recipe value may carry")
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


# Paths ---------------------------------------------------------------------------------------


def _parse_abs(node: _Node, field_: str) -> str:
    """An absolute guest path; newlines are refused because paths end up in unit files."""
    value = _str(node, field_)
    if not value.startswith("/"):
        _fail(node.loc, field_, f"{_show(value)} is not an absolute path (start it with /)")
    if "\n" in value or "\r" in value:
        _fail(node.loc, field_, "a path may not contain a newline")
    return value


_ABS = _Type("absolute path", _parse_abs, {"type": "string", "pattern": "^/[^\\n\\r]*$"})


def _confined(node: _Node, field_: str, value: str, *, want: str) -> Path:
    """Resolve a recipe-relative path and prove it stays inside the directory of its file.

    `want` is "file", "dir" or "any" (a regular file or a directory). The check is on the
    resolved path, so a symlink that points outside is caught as well as a `..` escape.
    """
    root = node.loc.dir
    if not value:
        _fail(node.loc, field_, "is empty")
    if PurePosixPath(value).is_absolute() or os.path.isabs(value):
        _fail(node.loc, field_,
              f"{_show(value)} is absolute; write it relative to the recipe's directory")
    lexical = Path(os.path.normpath(root / value))
    if not lexical.is_relative_to(root):
        _fail(node.loc, field_, f"{_show(value)} leaves the recipe's directory ({root})")
    resolved = (root / value).resolve()
    if not resolved.is_relative_to(root):
        _fail(node.loc, field_,
              f"{_show(value)} goes through a symlink to {resolved}, outside the recipe's "
              f"directory ({root})")
    if not resolved.exists():
        _fail(node.loc, field_, f"{_show(value)} does not exist (looked for {lexical})")
    if want == "file" and not resolved.is_file():
        _fail(node.loc, field_, f"{_show(value)} is not a file")
    if want == "dir" and not resolved.is_dir():
        _fail(node.loc, field_, f"{_show(value)} is not a directory")
    if want == "any" and not (resolved.is_file() or resolved.is_dir()):
        _fail(node.loc, field_, f"{_show(value)} is neither a regular file nor a directory")
    return resolved


def _walk_symlinks(top: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                yield path


@dataclass(frozen=True)
class _Src:
    written: str
    path: Path
    contents: bool


def _parse_src(node: _Node, field_: str) -> _Src:
    """A file or directory to copy. A directory is walked: a symlink inside it that points
    outside the recipe's directory would let the copy read files the recipe does not own."""
    value = _str(node, field_)
    contents = value.endswith("/")
    path = _confined(node, field_, value, want="dir" if contents else "any")
    if path.is_dir():
        for link in _walk_symlinks(path):
            target = link.resolve()
            if not target.is_relative_to(node.loc.dir):
                inner = link.relative_to(path).as_posix()
                _fail(node.loc, field_,
                      f"{_show(value)} contains {inner}, a symlink to {target}, outside the "
                      f"recipe's directory ({node.loc.dir})")
    return _Src(value, path, contents)


def _parse_playbook(node: _Node, field_: str) -> Path:
    return _confined(node, field_, _str(node, field_), want="file")


# Everything else -----------------------------------------------------------------------------

_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_PACKAGE_PATTERN = r"^[a-z0-9][a-z0-9+.-]+$"
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
              f"{RECIPE_VERSION} (see RECIPE.md)")
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


_FORMAT = _enum(("vmx",), {"ova": "not supported yet (only vmx)"})


_EXTENDS = _Type("recipe name or path", _str, {"type": "string"})


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One recipe key. `SETTINGS` is the single source for parsing, defaults, schema and docs."""

    section: str  # "" (top level), "guest", ..., or "application.files[]" (one files entry)
    key: str
    type: _Type
    description: str
    default: Any = None  # as a user would write it ("4GiB"); parsed like a written value
    required: bool = False
    default_doc: str | None = None  # for a default computed from other settings
    replace: bool = False  # a list the extending recipe replaces instead of appending to

    @property
    def path(self) -> str:
        return _join(self.section, self.key)

    @property
    def nullable(self) -> bool:
        """Optional keys without a default may be written as null, e.g. to unset a base's."""
        return self.default is None and not self.required and self.type.name != "section"


def _section(name: str) -> _Type:
    def parse(node: _Node, field_: str) -> dict[str, Any]:
        return _parse_section(name, node, field_, node.loc)

    return _Type("section", parse, {"$section": name})


def _build_file(values: Mapping[str, Any]) -> FileSpec:
    src: _Src = values["src"]
    return FileSpec(src=src.written, src_path=src.path, contents=src.contents,
                    dest=values["dest"], mode=values["mode"], owner=values["owner"])


def _file_entries() -> _Type:
    def parse(node: _Node, field_: str) -> FileSpec:
        return _build_file(_parse_section("application.files[]", node, field_, node.loc))

    item = _Type("file entry", parse, {"$section": "application.files[]"})
    return _list_of(item, name="list of {src, dest, mode, owner}")


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S("", "version", _Type("integer", _parse_version, {"type": "integer", "const": 1}),
       "Recipe format version. Must be 1; other values are refused.", required=True),
    _S("", "name", _regex_type("name", _NAME_PATTERN, "a valid name: use 1 to 63 lowercase "
                               "letters, digits and -, starting with a letter or digit"),
       "Names the image and its artifact files.", required=True),
    _S("", "extends", _EXTENDS,
       "A base recipe: a bare name (e.g. debian-12-minimal) is a recipe shipped in recipes/; "
       "anything containing / or ending in .yaml is a path relative to this file's directory. "
       "Mappings merge recursively, lists append (base first; job.command is replaced), "
       "scalars from the extending recipe win. Relative paths in a base are relative to the "
       "base's own directory."),
    _S("", "guest", _section("guest"), "The minimal Debian machine.", default={}),
    _S("", "application", _section("application"),
       "What is put into the image at build time.", default={}),
    _S("", "job", _section("job"),
       "The service that runs once at boot, then powers the VM off.", required=True),
    _S("", "output", _section("output"), "The VMware artifact.", default={}),

    _S("guest", "release", _regex_type("Debian suite", _SUITE_PATTERN, "a Debian suite name"),
       "Debian suite.", default="bookworm"),
    _S("guest", "arch", _enum(("amd64",), {
        a: "only amd64 is supported in recipe version 1" for a in
        ("arm64", "aarch64", "i386", "x86_64", "armhf", "armel", "ppc64el", "s390x", "riscv64")
    }), "Guest architecture; amd64 only in version 1.", default="amd64"),
    _S("guest", "mirror", _regex_type("URL", _URL_PATTERN, "an http:// or https:// URL",
                                      _check_url),
       "Debian mirror (http or https).",
       default_doc="the Debian mirror the build host's apt uses"),
    _S("guest", "packages",
       _list_of(_regex_type("package name", _PACKAGE_PATTERN, "a Debian package name"),
                unique=True),
       "Extra Debian packages installed in the image (repeats are dropped).", default=[]),
    _S("guest", "disk", _size(1024**3),
       "Virtual disk size: 512MiB, 4GiB, 2G or bytes. KiB/MiB/GiB/TiB and K/M/G/T are powers "
       "of 1024, KB/MB/GB/TB powers of 1000. At least 1GiB.", default="4GiB"),
    _S("guest", "memory", _size(128 * 1024**2),
       "Guest memory, same units as disk. At least 128MiB.", default="512MiB"),
    _S("guest", "cpus", _int(1, 64), "Virtual CPUs.", default=1),
    _S("guest", "firmware", _enum(("bios", "efi")), "Boot firmware.", default="bios"),
    _S("guest", "hostname", _regex_type("hostname", _HOSTNAME_PATTERN, "a valid host name "
                                        "label (letters, digits, -; at most 63)"),
       "Guest host name.", default_doc="the recipe name"),
    _S("guest", "timezone", _regex_type("timezone", _TIMEZONE_PATTERN,
                                        "a time zone name such as UTC or Europe/Berlin"),
       "Guest time zone (a tz database name).", default="UTC"),
    _S("guest", "ssh", _BOOL,
       "Added to RECIPE.md v1: keep sshd installed and enabled in the shipped image. No keys "
       "or passwords are left in the image either way.", default=False),

    _S("application", "files", _file_entries(),
       "Files and directories copied into the image, in order.", default=[]),
    _S("application", "run", _list_of(_ANY_STRING),
       "Shell steps run as root in the guest at build time, in order, kept verbatim.",
       default=[]),
    _S("application", "playbook", _Type("path", _parse_playbook, {"type": "string"}),
       "Ansible playbook (relative path) applied to the guest after files and run."),

    _S("application.files[]", "src", _Type("path", _parse_src, {"type": "string"}),
       "File or directory relative to the recipe's directory; it must exist and stay inside "
       "that directory (no .., no absolute path, no symlink pointing out). A trailing / means "
       "the directory's contents.", required=True),
    _S("application.files[]", "dest", _ABS, "Absolute path in the guest.", required=True),
    _S("application.files[]", "mode", _Type("octal string", _parse_mode,
                                            {"type": "string", "pattern": _MODE_PATTERN}),
       'Octal mode as a quoted string, e.g. "0755".'),
    _S("application.files[]", "owner", _regex_type("owner", _OWNER_PATTERN,
                                                   "a user name, optionally with :group"),
       "Owner, as user or user:group."),

    _S("job", "command", _Type("argv list or string", _parse_command, {
        "oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
                  {"type": "string", "minLength": 1}]}),
       "argv list (no shell; the program is an absolute path or a name in PATH), or a string "
       "run by /bin/sh -c. An extending recipe replaces it instead of appending.",
       required=True, replace=True),
    _S("job", "workdir", _ABS, "Working directory of the job.", default="/"),
    _S("job", "user", _regex_type("user name", _USER_PATTERN, "a valid user name"),
       "User the job runs as; created if missing.", default="root"),
    _S("job", "environment", _Type("mapping", _parse_environment, {
        "type": "object", "propertyNames": {"pattern": _ENV_NAME_PATTERN},
        "additionalProperties": {"type": ["string", "number"]}}),
       "Environment variables; values are strings, numbers are kept as written.", default={}),
    _S("job", "timeout", _DURATION,
       "The job is killed and the VM powered off after this (90s, 30m, 2h, 1d, 1h30m, or "
       "seconds).", default_doc="none"),
    _S("job", "network", _BOOL,
       "true: a NIC is configured and the job waits for network-online.", default=False),
    _S("job", "outputs", _ABS,
       "Directory in the guest returned to the host when the job ends.", default_doc="none"),

    _S("output", "hardware_version", _int(4, 21), "VMware virtualHW.version.", default=19),
    _S("output", "guest_os", _regex_type("VMware guestOS", _GUEST_OS_PATTERN,
                                         "a VMware guestOS identifier"),
       "VMware guestOS identifier.",
       default_doc="from guest.release: buster debian10-64, bullseye debian11-64, bookworm "
                   "and trixie debian12-64, else other5xlinux-64"),
    _S("output", "disk_controller", _enum(("pvscsi", "lsilogic", "sata", "nvme")),
       "Virtual disk controller.", default="pvscsi"),
    _S("output", "nic", _enum(("vmxnet3", "e1000e", "e1000")),
       "Network card, used only when job.network is true.", default="vmxnet3"),
    _S("output", "vmdk", _enum(("monolithicSparse", "streamOptimized")),
       "VMDK disk format.", default="monolithicSparse"),
    _S("output", "formats", _list_of(_FORMAT, unique=True, nonempty=True),
       "Artifacts to produce: vmx (vmdk + vmx). ova is not supported yet.", default=["vmx"]),
)
del _S

_SECTIONS: dict[str, tuple[Setting, ...]] = {}
for _setting in SETTINGS:
    _SECTIONS[_setting.section] = (*_SECTIONS.get(_setting.section, ()), _setting)
_REPLACED_LISTS = frozenset(s.path for s in SETTINGS if s.replace)

_GUEST_OS_BY_RELEASE = {
    "buster": "debian10-64",
    "bullseye": "debian11-64",
    "bookworm": "debian12-64",
    "trixie": "debian12-64",  # no newer Debian guestOS id is known to VMware products yet
}


def _from_python(value: object, loc: _Loc) -> _Node:
    """A node for a table default, so defaults go through the same parser as written values."""
    if isinstance(value, dict):
        return _Node(loc, mapping={str(k): (loc, _from_python(v, loc)) for k, v in value.items()})
    if isinstance(value, list):
        return _Node(loc, items=[_from_python(v, loc) for v in value])
    return _Node(loc, scalar=value, raw=str(value))


def _parse_section(
    section: str, node: _Node | None, field_: str, missing_at: _Loc
) -> dict[str, Any]:
    """Check one mapping against its rows of the table; return every key's value or default.

    An unknown key is an error (with a difflib suggestion): a typo must never be ignored.
    """
    settings = _SECTIONS[section]
    entries: dict[str, tuple[_Loc, _Node]] = {}
    if node is not None and not node.is_null:
        if node.mapping is None:
            _fail(node.loc, field_, f"expected a mapping, got {_kind(node)}")
        entries = node.mapping
    known = [s.key for s in settings]
    for key, (key_loc, _) in entries.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
            _fail(key_loc, _join(field_, key), f"unknown key ({hint})")
    values: dict[str, Any] = {}
    for s in settings:
        where = _join(field_, s.key)
        if s.key in entries:
            value = entries[s.key][1]
            if value.is_null and s.nullable:
                values[s.key] = None
            else:
                values[s.key] = s.type.parse(value, where)
        elif s.required:
            _fail(missing_at, where, "required, but not given")
        elif s.type.name == "section":
            values[s.key] = _parse_section(s.key, None, where, missing_at)
        elif s.default is None:
            values[s.key] = None
        else:
            values[s.key] = s.type.parse(_from_python(s.default, missing_at), where)
    return values


# --------------------------------------------------------------------------------------------
# Loading, with extends:
# --------------------------------------------------------------------------------------------


def recipes_dir() -> Path | None:
    """The directory of the base recipes shipped with vmbuild (`extends: <name>`).

    Installed wheels carry them as package data; a source checkout has them at the top.
    """
    here = Path(__file__)
    for candidate in (here.parent / "data" / "recipes", here.resolve().parents[1] / "recipes"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _display(path: Path) -> str:
    """A shipped base recipe's path as shown in errors: relative to the cwd when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read(path: Path, display: str, via: _Loc | None) -> str:
    where = via or _Loc(display, None, path.parent)
    what = "extends" if via else None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _fail(where, what, f"{display}: no such file")
    except IsADirectoryError:
        _fail(where, what, f"{display}: is a directory, not a recipe file")
    except OSError as exc:
        _fail(where, what, f"{display}: cannot read: {exc.strerror}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(display, line, None, "not UTF-8 text") from None


def _resolve_extends(node: _Node, display: str) -> tuple[Path, str]:
    """Find the file an `extends:` value names: a shipped recipe or a confined relative path."""
    value = _str(node, "extends")
    is_path = "/" in value or value.endswith((".yaml", ".yml")) or value.startswith(".")
    if not is_path:
        if not re.fullmatch(_EXTENDS_NAME_PATTERN, value):
            _fail(node.loc, "extends", f"{_show(value)} is not a recipe name or a path")
        shipped = recipes_dir()
        target = shipped / f"{value}.yaml" if shipped else None
        if target is None or not target.is_file():
            names = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped else []
            known = f"shipped recipes: {', '.join(names)}" if names else "none are installed"
            _fail(node.loc, "extends", f"{_show(value)}: no such base recipe ({known})")
        return target, _display(target)
    target = _confined(node, "extends", value, want="file")
    return target, os.path.normpath(os.path.join(os.path.dirname(display), value))


def _merge(base: _Node, child: _Node, path: str) -> _Node:
    """Maps merge recursively, lists append (base first), scalars: the extending recipe wins."""
    if base.mapping is not None and child.mapping is not None:
        merged = dict(base.mapping)
        for key, (key_loc, value) in child.mapping.items():
            if key in merged:
                value = _merge(merged[key][1], value, _join(path, key))
            merged[key] = (key_loc, value)
        return _Node(child.loc, mapping=merged)
    if base.items is not None and child.items is not None and path not in _REPLACED_LISTS:
        return _Node(child.loc, items=[*base.items, *child.items])
    if base.mapping is not None and child.is_null:  # `guest:` left empty: nothing to change
        return base
    return child


def _load_tree(
    path: Path, display: str, chain: list[Path], sources: list[Path], via: _Loc | None
) -> _Node:
    """One file and, through its `extends:`, its bases, merged into one tree."""
    text = _read(path, display, via)
    real = path.resolve()
    sources.append(path)
    # relative paths start in the directory the file was named in (like Recipe.directory),
    # even when the file itself is a symlink to elsewhere
    root = _compose(text, display, path.parent.resolve())
    if root is None:
        raise RecipeError(display, None, None, "the recipe is empty")
    if root.mapping is None:
        _fail(root.loc, None,
              f"a recipe is a mapping (version:, name:, job:, ...), got {_kind(root)}")
    if "version" in root.mapping:  # refuse a future format before misreading its keys
        _parse_version(root.mapping["version"][1], "version")
    mapping = dict(root.mapping)
    extends = mapping.pop("extends", None)
    root = _Node(root.loc, mapping=mapping)
    if extends is None or extends[1].is_null:
        return root
    node = extends[1]
    target, target_display = _resolve_extends(node, display)
    real_chain = [*chain, real]
    if target.resolve() in real_chain:
        names = " -> ".join([*(_display(p) for p in real_chain), _display(target.resolve())])
        _fail(node.loc, "extends", f"extends cycle: {names}")
    base = _load_tree(target, target_display, real_chain, sources, node.loc)
    return _merge(base, root, "")


def load_recipe(path: Path | str) -> Recipe:
    """Read, merge (`extends:`), validate and default a recipe.

    Raises RecipeError (exit status 2) naming file, line and field for anything wrong.
    Errors name files as the user gave them (relative stays relative).
    """
    display = os.fspath(path)
    absolute = Path(os.path.abspath(display))
    sources: list[Path] = []
    tree = _load_tree(absolute, display, [], sources, None)
    values = _parse_section("", tree, "", tree.loc)

    name: str = values["name"]
    guest = dict(values["guest"])
    if guest["hostname"] is None:
        guest["hostname"] = name.rstrip("-")  # a name may end in -, a host name may not
    output = dict(values["output"])
    if output["guest_os"] is None:
        output["guest_os"] = _GUEST_OS_BY_RELEASE.get(guest["release"], "other5xlinux-64")
    job = dict(values["job"])
    if job["environment"] is None:
        job["environment"] = {}
    application = dict(values["application"])
    return Recipe(
        path=absolute,
        name=name,
        guest=Guest(**guest),
        application=Application(**application),
        job=Job(**job),
        output=Output(**output),
        version=values["version"],
        sources=tuple(sources),
    )


# --------------------------------------------------------------------------------------------
# Derived from the table: JSON Schema, docs, canonical dict
# --------------------------------------------------------------------------------------------


def _resolve_sections(fragment: Any) -> Any:
    if isinstance(fragment, Mapping):
        if "$section" in fragment:
            return _object_schema(fragment["$section"])
        return {k: _resolve_sections(v) for k, v in fragment.items()}
    if isinstance(fragment, list):
        return [_resolve_sections(v) for v in fragment]
    return fragment


def _setting_schema(s: Setting) -> dict[str, Any]:
    schema: dict[str, Any] = _resolve_sections(copy.deepcopy(dict(s.type.schema)))
    description = s.description
    if s.default_doc:
        description += f" Default: {s.default_doc}."
    schema["description"] = description
    if s.default is not None and s.type.name != "section":
        schema["default"] = s.default
    if s.nullable:
        if isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        elif isinstance(schema.get("type"), list):
            schema["type"] = [*schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    return schema


def _object_schema(section: str) -> dict[str, Any]:
    settings = _SECTIONS[section]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {s.key: _setting_schema(s) for s in settings},
        "additionalProperties": False,
    }
    required = [s.key for s in settings if s.required]
    if required and section:
        schema["required"] = required
    elif required:  # a recipe that extends another may get these from its base
        schema["if"] = {"not": {"required": ["extends"]}}
        schema["then"] = {"required": required}
    return schema


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of recipe format version 1, for editors and CI."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vmbuild recipe, version 1",
        "description": "A YAML recipe describing a VMware job image (see RECIPE.md).",
        **_object_schema(""),
    }


def settings_doc() -> str:
    """A markdown table of every recipe key, generated from SETTINGS."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        if s.required:
            default = "required"
        elif s.default_doc:
            default = s.default_doc
        elif s.default is None or s.type.name == "section":
            default = ""
        else:
            default = f"`{json.dumps(s.default)}`"
        cells = [f"`{s.path}`", s.type.name, default, s.description]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(value: Any, base: Path) -> Any:
    """A JSON-able copy: tuples become lists, mappings sorted dicts, paths relative to `base`."""
    if isinstance(value, Path):
        return Path(os.path.relpath(value, base)).as_posix()
    if isinstance(value, Mapping):
        return {str(k): _plain(value[k], base) for k in sorted(value)}
    if isinstance(value, tuple | list):
        return [_plain(v, base) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), base) for f in fields(value)}
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The effective settings (merged and defaulted) as a canonical JSON-able dict.

    Sizes are bytes, durations seconds, paths relative to the recipe's directory; the
    recipe's own location is left out, so the same recipe hashes the same anywhere.
    """
    base = recipe.directory.resolve()
    files = [
        {
            "src": _plain(f.src_path, base) + ("/" if f.contents else ""),
            "dest": f.dest,
            "mode": f.mode,
            "owner": f.owner,
        }
        for f in recipe.application.files
    ]
    application = _plain(recipe.application, base)
    application["files"] = files
    return {
        "version": recipe.version,
        "name": recipe.name,
        "guest": _plain(recipe.guest, base),
        "application": application,
        "job": _plain(recipe.job, base),
        "output": _plain(recipe.output, base),
    }
