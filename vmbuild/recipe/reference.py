"""The recipe reference (docs/recipe.md), rendered from `SETTINGS`.

A user who clones the repository must find every key with its type, default, an example and
what it does. Writing that by hand next to the table would drift, so the document is rendered
from the table, and a test (and `--check`, for CI) fails when the checked-in file is stale:

    python -m vmbuild.recipe.reference            # rewrite docs/recipe.md
    python -m vmbuild.recipe.reference --check    # exit 1 if docs/recipe.md is out of date

Examples are stored in the table as the YAML a user would write (`example=`), so the quoting a
value needs (a mode such as "0755") shows as it must be typed; the tests parse every one.
This is the one Markdown renderer of the table (it replaced `settings_doc()`); `vmbuild
schema` stays the machine-readable form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from vmbuild.recipe.settings import _SECTIONS, SETTINGS, Setting

#: Where the rendered reference lives in a source checkout.
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"

SMALLEST = """\
version: 1
name: hi
job:
  command: echo hello from the guest
"""

_HEADER = """\
# The recipe reference

<!-- Generated from vmbuild/recipe/settings.py by `python -m vmbuild.recipe.reference`.
     Do not edit: change the table there and run that command (the tests check they agree). -->

A recipe is one YAML file that describes a VMware job image: a minimal Debian guest, your
application, and the job that runs once at boot and then powers the machine off. This page
lists every key of recipe format version 1, with its type, its default, an example and what
it does. `vmbuild check recipe.yaml` validates a recipe without building it, and
`vmbuild schema` prints the same format as JSON Schema for editors (yaml-language-server).

General rules:

- Paths are relative to the directory of the file they are written in and may not leave it:
  no `..` escape, no absolute source path, no symlink that points outside.
- Sizes take units (`512MiB`, `4GiB`, `2G`; KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024,
  KB/MB/GB/TB powers of 1000); durations take units (`90s`, `30m`, `2h`, `1d`, `1h30m`).
- An unknown key is an error that names the key, the file and the line: a typo is never
  silently ignored. Every error reads `file:line: field: message`, and `vmbuild` exits with
  status 2 for a bad recipe.
- An optional key without a default may be written as `null` to unset what a base recipe
  (`extends:`) gave it.
"""

#: Introductions of the sections that have no row of their own in the table.
_INTROS = {
    "": "The keys at the top of the file. `version`, `name` and `job` are required (a recipe "
        "that `extends:` another may get them from its base).",
    "application.files[]": "One entry of `application.files`: a file or directory of the "
                           "recipe's directory and where it goes in the guest.",
}


def _flow(value: Any) -> str:
    """A Python value as a user would write it in YAML, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _default(s: Setting) -> str:
    if s.required:
        return "required"
    if s.default_doc:
        return s.default_doc
    if s.default is None:
        return "none"
    return f"`{_flow(s.default)}`"


def _anchor(section: str) -> str:
    """GitHub's heading anchor for `## \\`section\\``: lowercase, punctuation dropped."""
    return "".join(c for c in section.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _title(section: str) -> str:
    return f"`{section}`" if section else "Top level"


def _intro(section: str) -> str:
    if section in _INTROS:
        return _INTROS[section]
    row = next(s for s in SETTINGS if s.path == section)
    presence = "Required." if row.required else "Optional."
    return f"{row.description} {presence}"


def _block(section: str, indent: int) -> list[str]:
    """The section as block YAML made of every key's example (the full example recipe)."""
    pad = " " * indent
    lines: list[str] = []
    for s in _SECTIONS[section]:
        if s.type.name == "section":
            lines += [f"{pad}{s.key}:", *_block(s.path, indent + 2)]
        elif f"{s.path}[]" in _SECTIONS:  # a list of entries: one entry, in block style
            entry = _block(f"{s.path}[]", indent + 4)
            first = f"{pad}  - {entry[0].lstrip()}"
            lines += [f"{pad}{s.key}:", first, *entry[1:]]
        else:
            lines.append(f"{pad}{s.key}: {s.example}")
    return lines


def full_example() -> str:
    """A recipe that sets every key to its example value (the tests load it)."""
    return "\n".join(_block("", 0)) + "\n"


def _setting(s: Setting) -> list[str]:
    return [
        f"### `{s.path}`",
        "",
        s.description,
        "",
        f"- type: {s.type.name}",
        f"- default: {_default(s)}",
        f"- example: `{s.key}: {s.example}`",
        "",
    ]


def render_reference() -> str:
    """docs/recipe.md: every key of the table, grouped by section, with the two examples."""
    sections = list(_SECTIONS)
    lines = [_HEADER]
    lines.append("Sections: " + ", ".join(
        f"[{_title(name)}](#{_anchor(_title(name))})" for name in sections) + ".")
    lines += ["", "## The smallest recipe", "", "```yaml", SMALLEST.rstrip("\n"), "```", ""]
    lines += [
        "## A full example", "",
        "Every key set to the example value given below (`app/`, `provision.yml` and "
        "`testdata/` must exist next to the recipe). It extends the shipped base recipe "
        "`debian-12-minimal`; its own values win.", "",
        "```yaml", full_example().rstrip("\n"), "```", "",
    ]
    for name in sections:
        lines += [f"## {_title(name)}", "", _intro(name), ""]
        for s in _SECTIONS[name]:
            if s.type.name != "section":  # a section is described by its own heading
                lines += _setting(s)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmbuild.recipe.reference",
        description="Write the recipe reference (docs/recipe.md) from the settings table.")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the table")
    parser.add_argument("path", nargs="?", type=Path, default=DOC_PATH,
                        help=f"the file to write or check (default {DOC_PATH})")
    args = parser.parse_args(argv)
    text = render_reference()
    path: Path = args.path
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            what = "is missing" if current is None else "is out of date"
            print(f"{path} {what}: run python -m vmbuild.recipe.reference", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
