"""The execute-node probe: ClassAd lines for STARTD_CRON and the config that installs it."""

from __future__ import annotations

import os
import platform
import plistlib
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
    assert ("VMBUILD_VMRUN_VERSION" in attrs) or attrs["VMBUILD_VMWARE"] == "false"
    assert attrs["VMBUILD_VMWARE_PRODUCT"] in ('"workstation"', '"player"', '"fusion"', '"none"')
    assert attrs["VMBUILD_VMWARE_X86"] in ("true", "false")
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
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(probe, "VMWARE_CONFIG", tmp_path / "no-config")
    attrs = _check_lines(probe.probe_lines(check_kvm=False))
    assert attrs["VMBUILD_VMWARE"] == "true"
    assert attrs["VMBUILD_VMRUN_VERSION"] == '"1.17.0 build-21139696"'
    # vmrun alone does not say which product it drives, nor which hardware it runs.
    assert attrs["VMBUILD_VMWARE_PRODUCT"] == '"none"'
    assert "VMBUILD_VMWARE_MAX_HWVERSION" not in attrs


def test_without_hypervisors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(probe, "VMWARE_CONFIG", tmp_path / "no-config")
    monkeypatch.setattr(probe, "FUSION_APP", tmp_path / "no.app")
    attrs = _check_lines(probe.probe_lines())
    assert attrs["VMBUILD_QEMU"] == attrs["VMBUILD_VMWARE"] == attrs["VMBUILD_KVM"] == "false"
    assert "VMBUILD_QEMU_VERSION" not in attrs
    assert attrs["VMBUILD_VMWARE_PRODUCT"] == '"none"'
    assert "VMBUILD_VMWARE_VERSION" not in attrs
    assert "VMBUILD_VMWARE_MAX_HWVERSION" not in attrs


def _tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(f"#!/bin/sh\n{script}\n")
    (directory / name).chmod(0o755)


@pytest.mark.parametrize(("product", "version", "hw"), [
    ("workstation", "17.6.3", 21), ("workstation", "17.5.0", 21), ("workstation", "17.0.2", 20),
    ("workstation", "16.2.5", 19), ("workstation", "16.1.2", 18), ("workstation", "15.5.7", 16),
    ("workstation", "14.1.8", 14), ("workstation", "12.5.9", 12), ("workstation", "25H2", 22),
    ("player", "17.5.1", 21), ("player", "16.2.0", 19), ("player", "7.1.4", 11),
    ("player", "6.0.0", 10), ("fusion", "13.6.2", 21), ("fusion", "13.0.2", 20),
    ("fusion", "12.2.3", 19), ("fusion", "12.1.0", 18), ("fusion", "11.5.7", 16),
    ("fusion", "8.5.10", 12), ("workstation", "5.5", None), ("workstation", "beta", None),
    ("none", "17.5.0", None), ("fusion", None, None),
])
def test_hardware_version_table(product: str, version: str | None, hw: int | None) -> None:
    assert probe.max_hw_version(product, version) == hw


def test_workstation_and_player_from_their_version_flags(tmp_path: Path) -> None:
    bin_ = tmp_path / "bin"
    _tool(bin_, "vmplayer", "echo 'VMware Player 16.2.4 build-20089737'")
    env = {"PATH": str(bin_)}
    player = probe.detect_vmware(system="Linux", machine="x86_64", env=env,
                                 vmware_config=tmp_path / "none")
    assert player == probe.VmwareProduct("player", "16.2.4", "20089737", 19, True)
    assert probe.vmrun_host_type(player) == "player"
    # Workstation Pro installs vmplayer too; vmware is the one that says "Pro".
    _tool(bin_, "vmware", "echo 'VMware Workstation 17.5.0 build-22583795'")
    ws = probe.detect_vmware(system="Linux", machine="x86_64", env=env,
                             vmware_config=tmp_path / "none")
    assert (ws.product, ws.version, ws.build, ws.max_hw) == ("workstation", "17.5.0",
                                                            "22583795", 21)
    assert probe.vmrun_host_type(ws) == "ws"


def test_linux_config_file_when_the_binaries_say_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text('libdir = "/usr/lib/vmware"\nplayer.product.version = "17.0.2"\n'
                      'workstation.product.version = "17.0.2"\n')
    found = probe.detect_vmware(system="Linux", machine="x86_64", env={"PATH": str(tmp_path)},
                                vmware_config=config)
    assert (found.product, found.version, found.max_hw) == ("workstation", "17.0.2", 20)
    nothing = probe.detect_vmware(system="Linux", machine="x86_64",
                                  env={"PATH": str(tmp_path)}, vmware_config=tmp_path / "no")
    assert nothing.product == "none" and nothing.max_hw is None
    assert probe.vmrun_host_type(nothing) is None


def _fusion_app(tmp_path: Path, version: str) -> Path:
    app = tmp_path / "VMware Fusion.app"
    (app / "Contents").mkdir(parents=True)
    with (app / "Contents" / "Info.plist").open("wb") as f:
        plistlib.dump({"CFBundleShortVersionString": version, "CFBundleVersion": "24205318",
                       "CFBundleIdentifier": "com.vmware.fusion"}, f)
    return app


def test_fusion_on_intel_and_on_apple_silicon(tmp_path: Path) -> None:
    app = _fusion_app(tmp_path, "13.5.2")
    intel = probe.detect_vmware(system="Darwin", machine="x86_64", fusion_app=app)
    assert intel == probe.VmwareProduct("fusion", "13.5.2", "24205318", 21, True)
    assert probe.vmrun_host_type(intel) == "fusion"
    arm = probe.detect_vmware(system="Darwin", machine="arm64", fusion_app=app)
    assert (arm.product, arm.max_hw, arm.x86) == ("fusion", 21, False)
    assert probe.vmrun_host_type(arm) is None  # no x86 guest runs there
    assert not probe.can_run_x86_guests("Darwin", "arm64")
    assert probe.can_run_x86_guests("Darwin", "x86_64")
    assert probe.can_run_x86_guests("Linux", "x86_64")
    assert not probe.can_run_x86_guests("Linux", "aarch64")
    missing = probe.detect_vmware(system="Darwin", machine="x86_64",
                                  fusion_app=tmp_path / "nowhere.app")
    assert missing.product == "none"


def test_probe_lines_for_fusion_on_apple_silicon(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """vmrun is there, but no x86 guest can run: VMBUILD_VMWARE is false, and the ad says why."""
    _tool(tmp_path / "bin", "vmrun", "echo 'vmrun version 1.17.0 build-24205318'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(probe, "FUSION_APP", _fusion_app(tmp_path, "13.6.0"))
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    attrs = _check_lines(probe.probe_lines(check_kvm=False))
    assert attrs["VMBUILD_VMWARE"] == "false"
    assert attrs["VMBUILD_VMWARE_PRODUCT"] == '"fusion"'
    assert attrs["VMBUILD_VMWARE_VERSION"] == '"13.6.0"'
    assert attrs["VMBUILD_VMWARE_MAX_HWVERSION"] == "21"
    assert attrs["VMBUILD_VMWARE_X86"] == "false"


def test_probe_lines_for_workstation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tool(tmp_path / "bin", "vmrun", "echo 'vmrun version 1.17.0 build-22583795'")
    _tool(tmp_path / "bin", "vmware", "echo 'VMware Workstation 17.5.0 build-22583795'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    attrs = _check_lines(probe.probe_lines(check_kvm=False))
    assert attrs["VMBUILD_VMWARE"] == "true"
    assert attrs["VMBUILD_VMWARE_PRODUCT"] == '"workstation"'
    assert attrs["VMBUILD_VMWARE_VERSION"] == '"17.5.0"'
    assert attrs["VMBUILD_VMWARE_MAX_HWVERSION"] == "21"
    assert attrs["VMBUILD_VMWARE_X86"] == "true"
    classad2 = pytest.importorskip("classad2")
    ad = classad2.parseOne("\n".join(probe.probe_lines(check_kvm=False)))
    assert ad["VMBUILD_VMWARE_MAX_HWVERSION"] == 21 and ad["VMBUILD_VMWARE_X86"] is True


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
