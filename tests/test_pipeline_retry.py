"""The app stage boots its build VM once more when the first boot never answered SSH (a TCG
guest that stalled early in its boot), and only then: other Packer failures end the build.
A stand-in `packer` script plays Packer's machine-readable side (fast, no VM)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmbuild.errors import BuildError
from vmbuild.events import Event
from vmbuild.pipeline import _app_stage
from vmbuild.recipe import load_recipe
from vmbuild.stages.base import BaseImage

FAKE_PACKER = """\
#!/bin/sh
# STAND-IN for packer (not Packer): version, validate, and a build whose outcome the test picks.
case "$1" in
  version) echo "Packer v1.6.6"; exit 0 ;;
  validate) exit 0 ;;
esac
n=$(cat "$FAKE_PACKER_STATE" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$FAKE_PACKER_STATE"
if [ "$n" -le "$FAKE_PACKER_FAILURES" ]; then
  echo "1,vmbuild,ui,error,$FAKE_PACKER_ERROR"
  echo "1,vmbuild,error,$FAKE_PACKER_ERROR"
  exit 1
fi
mkdir -p packer-output && : > packer-output/hi.qcow2
echo "1,vmbuild,ui,say,Builds finished."
"""


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, BaseImage, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "packer").write_text(FAKE_PACKER)
    (bin_dir / "packer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PACKER_STATE", str(tmp_path / "builds"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nname: hi\njob:\n  command: echo hi\n")
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    work = tmp_path / "work"
    work.mkdir()
    return recipe, BaseImage("k", disk, {}, cached=True), work


def test_a_boot_that_never_answered_ssh_is_booted_once_more(
        stage: tuple[Path, BaseImage, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, base, work = stage
    monkeypatch.setenv("FAKE_PACKER_FAILURES", "1")
    monkeypatch.setenv("FAKE_PACKER_ERROR", "Timeout waiting for SSH.")
    events: list[Event] = []
    _version, produced = _app_stage(load_recipe(recipe), base, work, events.append)
    assert produced.is_file()
    assert (work.parent / "builds").read_text().strip() == "2"
    assert [e.message for e in events if e.kind == "warning"] == [
        "the build VM's boot hung before SSH (console ends: (none)); booting it again"]


@pytest.mark.parametrize(("failures", "error"), [
    ("2", "Timeout waiting for SSH."),  # twice: a real problem, not a stalled boot
    ("1", "Script exited with non-zero exit status: 1"),  # not a hang: no second boot
])
def test_other_failures_end_the_build(stage: tuple[Path, BaseImage, Path],
                                      monkeypatch: pytest.MonkeyPatch,
                                      failures: str, error: str) -> None:
    recipe, base, work = stage
    monkeypatch.setenv("FAKE_PACKER_FAILURES", failures)
    monkeypatch.setenv("FAKE_PACKER_ERROR", error)
    with pytest.raises(BuildError, match="packer build failed"):
        _app_stage(load_recipe(recipe), base, work, lambda _e: None)
    expected = "2" if error.startswith("Timeout") else "1"
    assert (work.parent / "builds").read_text().strip() == expected
