"""Loading: read a recipe file, follow its `extends:` chain, merge, validate and default.

Errors name files as the user gave them (relative stays relative), and a shipped base recipe
relative to the cwd when it is under it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vmbuild.errors import RecipeError
from vmbuild.recipe.model import Application, Expect, Guest, Job, Output, Recipe, Validate
from vmbuild.recipe.paths import _confined
from vmbuild.recipe.settings import _GUEST_OS_BY_RELEASE, _REPLACED_LISTS, _parse_section
from vmbuild.recipe.units import format_duration
from vmbuild.recipe.values import _EXTENDS_NAME_PATTERN, _parse_version, _str
from vmbuild.recipe.yamlnodes import _compose, _fail, _join, _kind, _Loc, _Node, _show


def recipes_dir() -> Path | None:
    """The directory of the base recipes shipped with vmbuild (`extends: <name>`).

    Installed wheels carry them as package data; a source checkout has them at the top.
    """
    here = Path(__file__)  # vmbuild/recipe/loader.py
    for candidate in (here.parents[1] / "data" / "recipes", here.resolve().parents[2] / "recipes"):
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


def _written(tree: _Node, path: str) -> _Node | None:
    """The node a dotted key path was written as in the merged tree (None: not written).

    Merging keeps each value's own file and line, so this locates a value even when it came
    from a base recipe."""
    node = tree
    for key in path.split("."):
        if node.mapping is None or key not in node.mapping:
            return None
        node = node.mapping[key][1]
    return node


def _check_combinations(values: dict[str, Any], tree: _Node) -> None:
    """Refuse settings that are each valid but cannot work together.

    The table checks one key at a time; these need two, and are reported at the line a
    person has to change.
    """
    controller = _written(tree, "output.disk_controller")
    if (controller is not None and values["output"]["disk_controller"] == "nvme"
            and values["guest"]["firmware"] != "efi"):
        _fail(controller.loc, "output.disk_controller",
              "nvme needs guest.firmware: efi (VMware's BIOS cannot boot from NVMe); set "
              "guest.firmware: efi, or use pvscsi, lsilogic or sata")
    init = _written(tree, "guest.init")
    if init is not None and values["guest"]["init"] == "job":
        services = [name for name, wanted in (
            ("job.network", values["job"]["network"]), ("guest.ssh", values["guest"]["ssh"]),
            ("guest.vmware_tools", values["guest"]["vmware_tools"])) if wanted]
        if services:
            named = ", ".join(services[:-1]) + " and " + services[-1] if len(services) > 1 \
                else services[0]
            _fail(init.loc, "guest.init",
                  f"job starts no services, but {named} need{'s' if len(services) == 1 else ''}"
                  f" systemd's; use guest.init: systemd, or turn "
                  f"{'it' if len(services) == 1 else 'them'} off")
    validate = values["validate"]
    if validate["until"] == "started" and validate["running_for"] >= validate["timeout"]:
        running_for = format_duration(validate["running_for"])
        timeout = format_duration(validate["timeout"])
        at = _written(tree, "validate.running_for")
        if at is not None:
            _fail(at.loc, "validate.running_for",
                  f"{running_for} is not shorter than validate.timeout ({timeout}), which bounds "
                  "the whole boot test; shorten it or raise validate.timeout")
        at = _written(tree, "validate.timeout") or tree
        _fail(at.loc, "validate.timeout",
              f"{timeout} is not longer than validate.running_for ({running_for}), so the boot "
              "test would time out before the job has run long enough; raise it or shorten "
              "validate.running_for")


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
    _check_combinations(values, tree)

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
    validate = dict(values["validate"])
    validate["expect"] = Expect(**validate["expect"])
    if validate["environment"] is None:
        validate["environment"] = {}
    return Recipe(
        path=absolute,
        name=name,
        guest=Guest(**guest),
        application=Application(**application),
        job=Job(**job),
        output=Output(**output),
        version=values["version"],
        sources=tuple(sources),
        validate=Validate(**validate),
    )
