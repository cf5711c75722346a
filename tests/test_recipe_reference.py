"""The recipe reference (docs/recipe.md): in sync with the table, complete, and every example
in it is a value the loader accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmbuild.recipe import SETTINGS, load_recipe
from vmbuild.recipe.reference import SMALLEST, full_example, main, render_reference
from vmbuild.recipe.yamlnodes import _compose

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
LEAVES = [s for s in SETTINGS if s.type.name != "section"]


def recipe_dir(root: Path) -> Path:
    """A directory holding the files the examples name (app/, provision.yml, testdata/)."""
    (root / "app").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('hello')\n")
    (root / "provision.yml").write_text("- hosts: all\n")
    (root / "testdata").mkdir()
    (root / "testdata" / "numbers.txt").write_text("1 2 3\n")
    return root


def yaml_block_after(heading: str, text: str) -> str:
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_doc_is_in_sync_with_the_table() -> None:
    assert DOC.is_file(), "docs/recipe.md is missing: run python -m vmbuild.recipe.reference"
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/recipe.md is out of date: run python -m vmbuild.recipe.reference")


def test_every_key_is_documented_with_type_default_and_example() -> None:
    doc = render_reference()
    for s in SETTINGS:
        heading = f"## `{s.path}`" if s.type.name == "section" else f"### `{s.path}`"
        assert f"\n{heading}\n" in doc, s.path
    for s in LEAVES:
        block = doc.split(f"\n### `{s.path}`\n", 1)[1].split("\n#", 1)[0]
        assert s.description in block, s.path
        assert f"- type: {s.type.name}\n" in block, s.path
        assert f"- example: `{s.key}: {s.example}`" in block, s.path
        assert "- default: " in block, s.path
    for path in ("guest.vmware_tools", "validate.command", "validate.inputs",
                 "validate.environment", "validate.expect", "validate.expect.exit",
                 "validate.expect.output", "validate.until", "validate.running_for",
                 "validate.timeout"):
        assert f"`{path}`" in doc, path


def test_defaults_are_shown_as_written() -> None:
    doc = render_reference()

    def default_of(path: str) -> str:
        block = doc.split(f"\n### `{path}`\n", 1)[1]
        found = re.search(r"^- default: (.*)$", block, re.MULTILINE)
        assert found is not None
        return found.group(1)

    assert default_of("guest.memory") == "`512MiB`"
    assert default_of("guest.vmware_tools") == "`false`"
    assert default_of("job.command") == "required"
    assert default_of("job.timeout") == "none"
    assert default_of("guest.hostname") == "the recipe name"
    assert default_of("validate.command") == "job.command as written"
    assert default_of("validate.until") == "`exit`"
    assert default_of("validate.running_for") == "`30s`"
    assert default_of("validate.timeout") == "`10m`"
    assert default_of("validate.expect.exit") == "`0`"
    assert default_of("output.formats") == "`[vmx]`"


def test_every_setting_has_an_example() -> None:
    """Sections have none of their own: their keys' examples make up theirs."""
    missing = [s.path for s in LEAVES if not s.example]
    assert not missing, f"settings without an example: {missing}"


@pytest.mark.parametrize("setting", LEAVES, ids=[s.path for s in LEAVES])
def test_each_example_parses(setting: object, tmp_path: Path) -> None:
    """Each example goes through its own setting's parser, as if written in a recipe."""
    from vmbuild.recipe import Setting

    assert isinstance(setting, Setting)
    root = recipe_dir(tmp_path)
    assert setting.example is not None
    node = _compose(f"{setting.key}: {setting.example}\n", "example.yaml", root)
    assert node is not None and node.mapping is not None
    value = node.mapping[setting.key][1]
    setting.type.parse(value, setting.path)  # raises RecipeError on a bad example


def test_the_full_example_sets_every_key_and_loads(tmp_path: Path) -> None:
    root = recipe_dir(tmp_path)
    text = yaml_block_after("## A full example", DOC.read_text(encoding="utf-8"))
    assert text == full_example()
    (root / "recipe.yaml").write_text(text)
    r = load_recipe(root / "recipe.yaml")
    assert r.name == "hello"
    assert r.guest.vmware_tools is True
    assert (r.guest.firmware, r.output.disk_controller) == ("efi", "nvme")
    v = r.validate
    assert v.command == ("/opt/hello/main.py", "--selftest")
    assert v.inputs == (root / "testdata",)
    assert (v.until, v.running_for, v.timeout) == ("started", 20.0, 900.0)
    assert v.expect.output == "^RESULT [0-9]+$"
    assert r.application.files[0].mode == "0755"
    # every key of the table is written in it
    for s in LEAVES:
        assert re.search(rf"^ *(- )?{re.escape(s.key)}:( |$)", text, re.MULTILINE), s.path


def test_the_smallest_recipe_loads(tmp_path: Path) -> None:
    text = yaml_block_after("## The smallest recipe", render_reference())
    assert text == SMALLEST
    (tmp_path / "recipe.yaml").write_text(text)
    assert load_recipe(tmp_path / "recipe.yaml").name == "hi"


def test_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "docs" / "recipe.md"
    assert main(["--check", str(doc)]) == 1
    assert "is missing" in capsys.readouterr().err
    assert main([str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == render_reference()
    assert main(["--check", str(doc)]) == 0
    doc.write_text(render_reference().replace("512MiB", "256MiB"))
    assert main(["--check", str(doc)]) == 1
    assert "is out of date: run python -m vmbuild.recipe.reference" in capsys.readouterr().err
