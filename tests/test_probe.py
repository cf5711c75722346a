"""The execute-node probe: ClassAd lines for STARTD_CRON and the config that installs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmbuild.runner import probe
from vmbuild.schedulers import probe as reexported

_LINE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]* = (true|false|-?\d+|"(?:[^"\\]|\\.)*")$')


def _check_lines(lines: list[str]) -> dict[str, str]:
    attrs = {}
    for line in lines:
        assert _LINE.match(line), line
        name, _, value = line.partition(" = ")
        attrs[name] = value
    return attrs


def test_probe_lines_are_classad_lines() -> None:
    attrs = _check_lines(probe.probe_lines(check_kvm=False))
    assert attrs["VMBUILD_RUNNER_VERSION"].startswith('"')
    for flag in ("VMBUILD_QEMU", "VMBUILD_KVM", "VMBUILD_VMWARE"):
        assert attrs[flag] in ("true", "false")
    assert attrs["VMBUILD_KVM"] == "false"  # not checked
    assert ("VMBUILD_QEMU_VERSION" in attrs) == (attrs["VMBUILD_QEMU"] == "true")
    assert ("VMBUILD_VMWARE_VERSION" in attrs) == (attrs["VMBUILD_VMWARE"] == "true")
    classad2 = pytest.importorskip("classad2")
    ad = classad2.parseOne("\n".join(probe.probe_lines(check_kvm=False)))
    assert ad["VMBUILD_QEMU"] in (True, False)


def test_versions_from_fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vmrun = tmp_path / "vmrun"
    vmrun.write_text("#!/bin/sh\necho\necho 'vmrun version 1.17.0 build-21139696'\n"
                     "echo\necho 'Usage: vmrun [AUTHENTICATION-FLAGS] COMMAND'\nexit 255\n")
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text('#!/bin/sh\necho "QEMU emulator version 7.2.11 (Debian 1:7.2+dfsg-7)"\n')
    for tool in (vmrun, qemu):
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert probe.vmware_version() == "1.17.0 build-21139696"
    assert probe.qemu_version(str(qemu)) == "7.2.11"
    attrs = _check_lines(probe.probe_lines(check_kvm=False))
    assert attrs["VMBUILD_VMWARE"] == "true"
    assert attrs["VMBUILD_VMWARE_VERSION"] == '"1.17.0 build-21139696"'


def test_without_hypervisors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    attrs = _check_lines(probe.probe_lines())
    assert attrs["VMBUILD_QEMU"] == attrs["VMBUILD_VMWARE"] == attrs["VMBUILD_KVM"] == "false"
    assert "VMBUILD_QEMU_VERSION" not in attrs


def test_classad_strings_are_escaped() -> None:
    assert probe.classad_value('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert probe.classad_value(True) == "true" and probe.classad_value(3) == "3"


def test_condor_config_snippet() -> None:
    text = reexported.condor_config_snippet("/opt/vmbuild/vmbuild-run.pyz")
    lines = dict(line.split(" = ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    assert lines["STARTD_CRON_JOBLIST"] == "$(STARTD_CRON_JOBLIST) VMBUILD"
    assert lines["STARTD_CRON_VMBUILD_EXECUTABLE"] == "/usr/bin/python3"
    assert lines["STARTD_CRON_VMBUILD_ARGS"] == "-m vmbuild.runner.probe"
    assert lines["STARTD_CRON_VMBUILD_ENV"] == "PYTHONPATH=/opt/vmbuild/vmbuild-run.pyz"
    assert lines["STARTD_CRON_VMBUILD_MODE"] == "Periodic"
    assert "STARTD_CRON_VMBUILD_PERIOD" in lines
    installed = reexported.condor_config_snippet("/usr/local/bin/vmbuild")
    assert "STARTD_CRON_VMBUILD_EXECUTABLE = /usr/local/bin/vmbuild" in installed
    assert "STARTD_CRON_VMBUILD_ARGS = probe" in installed
    with pytest.raises(ValueError):
        reexported.condor_config_snippet("/opt/my dir/vmbuild-run.pyz")


def test_probe_runs_from_the_bundle(tmp_path: Path) -> None:
    """What STARTD_CRON runs: PYTHONPATH=bundle python3 -m vmbuild.runner.probe."""
    try:
        from vmbuild.runner.bundle import write_bundle
    except ImportError:
        pytest.skip("vmbuild.runner.bundle is not there yet")
    bundle = tmp_path / "vmbuild-run.pyz"
    write_bundle(bundle)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(bundle)}
    proc = subprocess.run([sys.executable, "-s", "-m",
                           "vmbuild.runner.probe", "--no-kvm-check"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _check_lines(proc.stdout.splitlines())
