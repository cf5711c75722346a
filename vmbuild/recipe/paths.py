"""Paths: absolute guest paths, and host paths confined to the recipe's directory.

A host path in a recipe (a file to copy, a playbook, an `extends:` file) is relative to the
directory of the file it is written in and may not leave it: not by `..`, not by an absolute
path, not through a symlink.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmbuild.recipe.values import _str, _Type
from vmbuild.recipe.yamlnodes import _fail, _kind, _Node, _show
from vmbuild.runner.jobio import INPUT_SPEC


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
    try:  # a name too long for the filesystem, a loop of links...: the OS says so here
        resolved = (root / value).resolve()
        exists = resolved.exists()
    except OSError as exc:
        _fail(node.loc, field_, f"{_show(value)} cannot be looked up: "
              f"{exc.strerror or exc}")
    if not resolved.is_relative_to(root):
        _fail(node.loc, field_,
              f"{_show(value)} goes through a symlink to {resolved}, outside the recipe's "
              f"directory ({root})")
    if not exists:
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


def _parse_inputs(node: _Node, field_: str) -> tuple[Path, ...]:
    """`validate.inputs`: files and directories confined like `application.files[].src`.

    Each lands on the input disk under its own base name, as `vmbuild run --input` puts it,
    so two with one name (or one named like the runner's own spec file) are refused here,
    at the line that collides, instead of when the validation boot is being set up.
    """
    if node.items is None:
        _fail(node.loc, field_, f"expected a list of paths, got {_kind(node)}")
    paths: list[Path] = []
    names: dict[str, str] = {}
    for i, item in enumerate(node.items):
        where = f"{field_}[{i}]"
        path = _parse_src(item, where).path
        if path in paths:  # lists append across extends: a repeat is the same input
            continue
        if path.name == INPUT_SPEC:
            _fail(item.loc, where,
                  f"{_show(item.scalar)}: {INPUT_SPEC} is the name of the runner's own file on "
                  "the input disk; rename it")
        if path.name in names:
            _fail(item.loc, where,
                  f"{_show(item.scalar)}: another input ({_show(names[path.name])}) has the "
                  f"name {_show(path.name)}; each input is put on the input disk under its "
                  "own name")
        names[path.name] = str(item.scalar)
        paths.append(path)
    return tuple(paths)


_INPUTS = _Type("list of paths", _parse_inputs, {"type": "array", "items": {"type": "string"}})
