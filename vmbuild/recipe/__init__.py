"""The recipe model (RECIPE.md, version 1): load YAML, validate, apply defaults and `extends:`.

Everything a recipe may say is listed once, in `SETTINGS` (mkosi style): each row names the
section and key, the parser that checks and converts the value, the default, a description and
the JSON-Schema fragment and an example. Parsing, defaults, `recipe_schema()` (what `vmbuild
schema` prints) and the Markdown reference docs/recipe.md (`render_reference()`) are all driven
by that one table, so they cannot drift apart.

Values keep the file and line they were written on (the YAML is composed into nodes, not
loaded into plain dicts) because every error must say `file:line: field: message`: a typo in
a recipe is found by a person reading that line, never by reading a traceback.

The package, one job per module:

- model.py: the dataclasses a loaded recipe is made of (`Recipe`, `Guest`, ...)
- yamlnodes.py: YAML composed into nodes that keep file and line; located errors
- values.py: value types and parsers (strings, patterns, enums, lists, mode, command, ...)
- units.py: sizes and durations (`parse_size`, `format_size`, `parse_duration`)
- paths.py: guest paths, and host paths confined to the recipe's directory
- settings.py: the `SETTINGS` table and the section parser driven by it
- loader.py: `load_recipe` with `extends:` (read, merge, validate, default), `recipes_dir`
- schema.py: `recipe_schema`, the JSON Schema derived from the table
- reference.py: `render_reference`, docs/recipe.md derived from the table (also
  `python -m vmbuild.recipe.reference [--check]`; not imported here, so that `-m` runs it
  cleanly)
- canonical.py: `recipe_to_dict`, the effective settings as a canonical dict
"""

from __future__ import annotations

from vmbuild.errors import RecipeError as RecipeError
from vmbuild.recipe.canonical import recipe_to_dict
from vmbuild.recipe.loader import load_recipe, recipes_dir
from vmbuild.recipe.model import RECIPE_VERSION as RECIPE_VERSION
from vmbuild.recipe.model import (
    Application,
    Expect,
    FileSpec,
    Guest,
    Job,
    Output,
    Recipe,
    Validate,
)
from vmbuild.recipe.schema import recipe_schema
from vmbuild.recipe.settings import SETTINGS, Setting
from vmbuild.recipe.settings import _from_python as _from_python
from vmbuild.recipe.units import format_duration, format_size, parse_duration, parse_size
from vmbuild.recipe.yamlnodes import _Loc as _Loc

__all__ = [
    "SETTINGS",
    "Application",
    "Expect",
    "FileSpec",
    "Guest",
    "Job",
    "Output",
    "Recipe",
    "Setting",
    "Validate",
    "format_duration",
    "format_size",
    "load_recipe",
    "parse_duration",
    "parse_size",
    "recipe_schema",
    "recipe_to_dict",
    "recipes_dir",
]
