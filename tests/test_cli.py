"""The CLI as users and CI pipelines see it: exit statuses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_vmbuild

GOOD = "version: 1\nname: hi\njob:\n  command: echo hello from the guest\n"

BAD_RECIPES = {
    "unknown key": (GOOD + "  comand: oops\n", ":5: job.comand: unknown key"),
    "wrong type": ("version: 1\nname: hi\nguest:\n  cpus: [1]\njob:\n  command: x\n",
                   ":4: guest.cpus:"),
    "bad size": ("version: 1\nname: hi\nguest:\n  memory: lots\njob:\n  command: x\n",
                 ":4: guest.memory:"),
    "escaping src": ("version: 1\nname: hi\napplication:\n  files:\n    - src: ../x\n"
                     "      dest: /x\njob:\n  command: x\n", ":5: application.files[0].src:"),
    "missing command": ("version: 1\nname: hi\njob:\n  workdir: /\n", "job.command"),
    "yaml syntax": ("version: 1\nname: [hi\njob:\n  command: x\n", "YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_gives_one_located_line_and_exit_2(case: str, tmp_path: Path) -> None:
    text, expected = BAD_RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    for command in (["check"], ["build"], []):
        proc = run_vmbuild(*command, recipe, "-o" if command != ["check"] else "--json",
                           *([tmp_path / "out"] if command != ["check"] else []),
                           timeout=60)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(recipe) in lines[0] and expected in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_check_accepts_the_examples() -> None:
    for recipe in sorted(EXAMPLES.glob("*/recipe.yaml")):
        proc = run_vmbuild("check", recipe, "--json", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["name"] == recipe.parent.name


def test_schema_is_json_schema() -> None:
    proc = run_vmbuild("schema", timeout=60)
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["additionalProperties"] is False
    assert "job" in schema["properties"]


def test_missing_recipe_file_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_vmbuild(tmp_path / "nope.yaml", timeout=60)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_output_dir_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    proc = run_vmbuild(recipe, "-o", out, timeout=60)
    assert proc.returncode == 2
    assert "precious" in proc.stderr
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_run_is_wired_to_the_runner(tmp_path: Path) -> None:
    proc = run_vmbuild("run", "--help", timeout=60)
    assert proc.returncode == 0
    assert "85" in proc.stdout and "--checkpoint-every" in proc.stdout
    proc = run_vmbuild("run", tmp_path / "missing.vmx", "--workdir", tmp_path / "w", timeout=60)
    assert proc.returncode in (2, 90)
    assert "missing.vmx" in proc.stderr and "Traceback" not in proc.stderr


def test_runner_bundle_runs_with_a_plain_python(tmp_path: Path) -> None:
    import subprocess

    bundle = tmp_path / "vmbuild-run.pyz"
    assert run_vmbuild("runner-bundle", "-o", bundle, timeout=60).returncode == 0
    proc = subprocess.run(["/usr/bin/python3", "-I", str(bundle), "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--workdir" in proc.stdout


def test_efi_from_an_lsi_controller_is_refused_before_building(tmp_path: Path) -> None:
    """QEMU's EFI firmware has no LSI Logic driver, so the validation boot of such an image
    would wait in the UEFI shell until its timeout: the build says so at once (exit 2) and
    builds nothing; with --no-validate it is left to VMware, which boots it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD + "guest:\n  firmware: efi\noutput:\n  disk_controller: lsilogic\n")
    out = tmp_path / "out"
    proc = run_vmbuild(recipe, "-o", out, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "OVMF" in proc.stderr and "--no-validate" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
