"""`vmbuild init`: start a new job image from a template that checks and builds as it stands.

The templates are real files under ``vmbuild/templates/<template>/`` (package data), so they
can be read, diffed and tested like any other recipe. The only substitution is the image
name, written wherever a template says ``__NAME__``; the name must obey the recipe's name
rule, which also makes it safe inside YAML, shell steps, C source and paths, so no quoting
is ever needed.

Nothing is ever half-written: the files go into a temporary directory beside the target,
which is renamed onto it at the end (rename replaces an empty directory atomically).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vmbuild.errors import UsageError

TEMPLATES = ("python", "shell", "binary")
DEFAULT_TEMPLATE = "python"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # the recipe's `name` rule (RECIPE.md)
PLACEHOLDER = "__NAME__"


def _template_root(template: str) -> Traversable:
    if template not in TEMPLATES:
        raise UsageError(f"--template {template!r}: use one of {', '.join(TEMPLATES)}")
    root = resources.files("vmbuild") / "templates" / template
    if not root.is_dir():  # a broken installation, not the user's mistake, but say so
        raise UsageError(f"template {template!r} is missing from this vmbuild installation")
    return root


def check_name(name: str, *, derived_from: Path | None = None) -> str:
    """Refuse a name the recipe loader would refuse, before anything is written."""
    if NAME_RE.fullmatch(name):
        return name
    where = f" (from the directory name {derived_from.name!r})" if derived_from else ""
    hint = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
    suggestion = f"; for example --name {hint}" if hint and NAME_RE.fullmatch(hint) else ""
    raise UsageError(f"image name {name!r}{where} is not valid: use lower-case letters, digits "
                     f"and '-', starting with a letter or digit, at most 63 characters"
                     f"{suggestion}")


def _copy(source: Traversable, target: Path, name: str) -> list[Path]:
    """Copy a template tree, substituting the name in text files; return what was written."""
    written: list[Path] = []
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        dest = target / entry.name
        if entry.is_dir():
            dest.mkdir()
            written += _copy(entry, dest, name)
            continue
        data = entry.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            dest.write_bytes(data)
        else:
            dest.write_text(text.replace(PLACEHOLDER, name), encoding="utf-8")
        written.append(dest)
    return written


def init_project(directory: Path, template: str = DEFAULT_TEMPLATE,
                 name: str | None = None) -> list[Path]:
    """Write a new recipe, app and README into ``directory``; return the files written.

    ``directory`` may be missing or empty; anything in it already is the user's work, which
    an init must never overwrite or mix with."""
    root = _template_root(template)
    directory = directory.absolute()
    name = check_name(name) if name is not None else check_name(directory.name,
                                                                derived_from=directory)
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{directory}: exists and is not a directory")
        if any(directory.iterdir()):
            raise UsageError(f"{directory}: not empty; vmbuild init writes only into a new or "
                             "empty directory (it never overwrites your files)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    mode = directory.stat().st_mode & 0o7777 if directory.exists() else 0o777 & ~umask
    stage = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=directory.parent))
    try:
        written = _copy(root, stage, name)
        stage.chmod(mode)
        try:
            os.rename(stage, directory)  # replaces an empty directory; fails on a non-empty one
        except OSError as exc:
            raise UsageError(f"{directory}: could not be created ({exc.strerror}); was it "
                             "changed while vmbuild init ran?") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return [directory / path.relative_to(stage) for path in written]
