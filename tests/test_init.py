"""`vmbuild init`: what it writes is a valid recipe that builds, and it never clobbers a user's
directory or writes a name the recipe loader would refuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import _needs_build_host, run_vmbuild
from vmbuild.init import TEMPLATES


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_passes_check(template: str, tmp_path: Path) -> None:
    target = tmp_path / f"my-{template}-job"
    proc = run_vmbuild("init", target, "--template", template, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (target / "README.md").is_file()
    written = {Path(line).relative_to(target).as_posix() for line in proc.stdout.splitlines()}
    assert {"recipe.yaml", "README.md"} <= written
    assert all((target / rel).is_file() for rel in written)
    assert not any("__NAME__" in (target / rel).read_text() for rel in written)

    check = run_vmbuild("check", target / "recipe.yaml", "--json", timeout=60)
    assert check.returncode == 0, check.stderr
    effective = json.loads(check.stdout)
    assert effective["name"] == f"my-{template}-job"
    assert effective["validate"]["expect"]["output"] == f"^my-{template}-job: done"
    assert effective["job"]["outputs"]

    # The keys a researcher needs are shown, the optional ones as comments to uncomment.
    text = (target / "recipe.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["extends"] == "debian-12-minimal"
    assert "# inputs: [testdata/]" in text and "# until: started" in text
    uncommented = yaml.safe_load(text.replace("  # inputs:", "  inputs:")
                                 .replace("  # until:", "  until:"))
    assert uncommented["validate"]["inputs"] == ["testdata/"]
    assert uncommented["validate"]["until"] == "started"
    assert (target / "testdata").is_dir()


def test_name_option_and_existing_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "Some_Dir"
    target.mkdir()
    proc = run_vmbuild("init", target, "--name", "sim-2", "--template", "shell", timeout=60)
    assert proc.returncode == 0, proc.stderr
    check = run_vmbuild("check", target / "recipe.yaml", "--json", timeout=60)
    assert check.returncode == 0 and json.loads(check.stdout)["name"] == "sim-2"


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "work"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    proc = run_vmbuild("init", target, timeout=60)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary left behind


@pytest.mark.parametrize("args", [("Bad_Name",), ("ok-dir", "--name", "a;rm -rf /"),
                                  ("ok-dir", "--name", "-leading-dash"),
                                  ("ok-dir", "--name", "x" * 64)])
def test_a_bad_name_is_refused(args: tuple[str, ...], tmp_path: Path) -> None:
    target, *options = args
    proc = run_vmbuild("init", tmp_path / target, *options, timeout=60)
    assert proc.returncode == 2, proc.stdout
    assert "is not valid" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_an_unknown_template_is_refused(tmp_path: Path) -> None:
    proc = run_vmbuild("init", tmp_path / "job", "--template", "rust", timeout=60)
    assert proc.returncode == 2
    assert "python, shell, binary" in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_python_template_builds_and_validates(tmp_path: Path) -> None:
    _needs_build_host()
    target = tmp_path / "init-demo"
    run_vmbuild("init", target, "--template", "python", timeout=60, check=True)
    out = tmp_path / "out"
    proc = run_vmbuild(target / "recipe.yaml", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])["result"]
    assert result["validated"] is True
    assert result["validation"]["mode"] == "exit" and result["validation"]["status"] == 0
    # The job's own lines, read back from the validation boot.
    outputs = [json.loads(line) for line in proc.stdout.splitlines()[:-1]]
    said = [e.get("message", "") for e in outputs if e.get("kind") == "output"]
    assert any(line.startswith("init-demo: done") for line in said), said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["mode"] == "exit"
    assert (out / "init-demo.vmx").is_file()
