"""Located values: the YAML tree with file and line kept on every node.

Values keep the file and line they were written on (the YAML is composed into nodes, not
loaded into plain dicts) because every error must say `file:line: field: message`. Duplicate
keys, non-string keys, unsupported tags and alias bombs are refused here, before any value
is looked at.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from vmbuild.errors import RecipeError


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
            return _Node(loc, scalar=self.construct(ynode, path), raw=str(ynode.value))
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

    def construct(self, ynode: yaml.ScalarNode, path: str) -> object:
        """The scalar's value as YAML types it. PyYAML's constructors raise plain Python
        errors for text their type cannot hold (`!!bool maybe`, `!!int abc`, an unquoted
        2024-02-30 read as a date), which would otherwise escape as a traceback."""
        try:
            return self.loader.construct_object(ynode)
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
            tag = ynode.tag.replace(_TAG, "!!")
            _fail(self.loc(ynode), path or None,
                  f"{_show(str(ynode.value))} is not a valid {tag} value")

    def key(self, key_node: yaml.Node, path: str) -> str:
        loc = self.loc(key_node)
        if not isinstance(key_node, yaml.ScalarNode):
            _fail(loc, path, "a key must be a plain string, not a list or a mapping")
        value: object = self.construct(key_node, path)
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
