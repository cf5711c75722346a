"""Derived from the table: the JSON Schema (`vmbuild schema`). The Markdown reference is
reference.py."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from vmbuild.recipe.settings import _SECTIONS, Setting


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
        "description": "A YAML recipe describing a VMware job image (see docs/recipe.md).",
        **_object_schema(""),
    }
