"""The playbook's own tasks (vmbuild/stages/playbook.py): what they hand the guest, checked
without a guest. The booted proof is every build in tests/test_build_e2e.py (slow)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import yaml

from vmbuild.recipe import load_recipe
from vmbuild.stages.playbook import (
    PACKAGES_TASK,
    write_playbook,
    write_system_installer,
    write_system_overlay,
)


def hello(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nname: hello\njob:\n  command: [/bin/true]\n")
    return path


def test_the_system_installer_feeds_tar_exactly_the_overlay(tmp_path: Path) -> None:
    overlay, installer = tmp_path / "system.tar", tmp_path / "system.sh"
    write_system_overlay(load_recipe(hello(tmp_path)), overlay)
    write_system_installer(overlay, installer)
    # The script as the guest runs it (sh FILE), with a tar that keeps what it is given and
    # the arguments it got, instead of extracting over this machine's root.
    bin_dir, got = tmp_path / "bin", tmp_path / "got"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text(f'#!/bin/sh\necho "$@" > {got}.args\ncat > {got}\n')
    (bin_dir / "tar").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(installer)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert got.read_bytes() == overlay.read_bytes()
    assert (tmp_path / "got.args").read_text().split() == [
        "-x", "--no-overwrite-dir", "--no-same-owner", "-f", "-", "-C", "/"]
    with tarfile.open(got) as tar:
        assert "etc/vmbuild/job.json" in tar.getnames()


def test_vmbuild_own_tasks_need_no_python_module_in_the_guest(tmp_path: Path) -> None:
    """Each Python module is seconds of a build under TCG; vmbuild's fixed tasks use none
    (the files: copies and run: steps are the recipe's, and keep Ansible's modules)."""
    plays = yaml.safe_load(write_playbook(load_recipe(hello(tmp_path)),
                                          tmp_path / "staging").read_text())
    tasks = {task["name"]: task for play in plays for task in play["tasks"]}
    modules = {name: next(key for key in task if key != "name") for name, task in tasks.items()}
    assert modules == {
        "system: install hostname, time zone and the job service": "ansible.builtin.script",
        PACKAGES_TASK: "ansible.builtin.raw",
        "seal: remove build keys and access, lock root, clean, trim": "ansible.builtin.script",
    }
