"""The effective settings of a loaded recipe as a canonical JSON-able dict (`vmbuild check
--json`, and the input of the build hash)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from vmbuild.recipe.model import Recipe


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
    `validate` is part of it (it is what the image was proven with), but nothing that keys a
    cache reads it: the base key hashes only `BaseSettings` (stages/base.py).
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
        "validate": _plain(recipe.validate, base),
    }
