"""The execute-node probe: ClassAd lines saying whether this machine can run vmbuild VMs.

HTCondor runs it as a STARTD_CRON job and merges the lines into the machine ad; submit files
written by ``vmbuild submit`` match on them (``VMBUILD_QEMU =?= true || VMBUILD_VMWARE =?=
true``). Standard library only: it ships inside the runner bundle, and runs from it with
``PYTHONPATH=vmbuild-run.pyz python3 -m vmbuild.runner.probe``.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

from vmbuild.runner import accel

RUNNER_VERSION: str
try:
    from vmbuild import __version__ as RUNNER_VERSION
except ImportError:  # pragma: no cover - a bundle built without vmbuild/__init__.py
    RUNNER_VERSION = "0+unknown"

__all__ = ["RUNNER_VERSION", "classad_value", "condor_config_snippet", "main",
           "probe_attributes", "probe_lines", "qemu_version", "vmware_version"]

_TIMEOUT = 15.0
_QEMU_VERSION_RE = re.compile(r"version\s+(\d+(?:\.\d+)+)")
_VMRUN_VERSION_RE = re.compile(r"vmrun version\s+(\d+(?:\.\d+)+)(?:\s+build-(\d+))?", re.I)


def _output(argv: Sequence[str]) -> str:
    """stdout + stderr of a short command; empty when it cannot run. Never raises."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT,
                              stdin=subprocess.DEVNULL, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout + proc.stderr


def qemu_version(binary: str | None = None) -> str | None:
    """``7.2.11`` from ``qemu-system-x86_64 --version``; None without QEMU."""
    binary = binary or accel.qemu_binary()
    if binary is None:
        return None
    match = _QEMU_VERSION_RE.search(_output([binary, "--version"]))
    return match.group(1) if match else "unknown"


def vmrun_binary() -> str | None:
    return shutil.which("vmrun")


def vmware_version(binary: str | None = None) -> str | None:
    """``1.17.0 build-21139696`` from vmrun's banner (it prints it with its usage text)."""
    binary = binary or vmrun_binary()
    if binary is None:
        return None
    match = _VMRUN_VERSION_RE.search(_output([binary]))
    if not match:
        return "unknown"
    return f"{match.group(1)} build-{match.group(2)}" if match.group(2) else match.group(1)


def classad_value(value: bool | int | str) -> str:
    """A ClassAd literal for a Python value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def probe_attributes(check_kvm: bool = True) -> dict[str, bool | int | str]:
    """What this machine offers, as ClassAd attribute name -> value."""
    attrs: dict[str, bool | int | str] = {
        "VMBUILD_RUNNER_VERSION": RUNNER_VERSION,
        "VMBUILD_PYTHON_VERSION": platform.python_version(),
    }
    qemu = qemu_version()
    attrs["VMBUILD_QEMU"] = qemu is not None
    if qemu is not None:
        attrs["VMBUILD_QEMU_VERSION"] = qemu
    attrs["VMBUILD_KVM"] = bool(check_kvm and qemu is not None and accel.kvm_works())
    vmware = vmware_version()
    attrs["VMBUILD_VMWARE"] = vmware is not None
    if vmware is not None:
        attrs["VMBUILD_VMWARE_VERSION"] = vmware
    return attrs


def probe_lines(check_kvm: bool = True) -> list[str]:
    """``NAME = VALUE`` lines for a STARTD_CRON hook (one attribute a line)."""
    return [f"{name} = {classad_value(value)}"
            for name, value in probe_attributes(check_kvm).items()]


def condor_config_snippet(runner: str, *, python: str = "/usr/bin/python3",
                          period: str = "1h") -> str:
    """HTCondor configuration that runs the probe on an execute node.

    ``runner`` is the absolute path of the runner bundle (``.pyz``, run through ``python``)
    or of an installed ``vmbuild`` command (run as ``vmbuild probe``).
    """
    if any(ch.isspace() for ch in runner) or any(ch.isspace() for ch in python):
        raise ValueError("put the runner and python at paths without white space")
    lines = [
        "# vmbuild: advertise whether this machine can run vmbuild VM jobs",
        "# (VMBUILD_QEMU, VMBUILD_KVM, VMBUILD_VMWARE, ... in the machine ad).",
        "STARTD_CRON_JOBLIST = $(STARTD_CRON_JOBLIST) VMBUILD",
    ]
    if runner.endswith(".pyz"):
        lines += [
            f"STARTD_CRON_VMBUILD_EXECUTABLE = {python}",
            "STARTD_CRON_VMBUILD_ARGS = -m vmbuild.runner.probe",
            f"STARTD_CRON_VMBUILD_ENV = PYTHONPATH={runner}",
        ]
    else:
        lines += [
            f"STARTD_CRON_VMBUILD_EXECUTABLE = {runner}",
            "STARTD_CRON_VMBUILD_ARGS = probe",
        ]
    lines += [
        "STARTD_CRON_VMBUILD_MODE = Periodic",
        f"STARTD_CRON_VMBUILD_PERIOD = {period}",
        "STARTD_CRON_VMBUILD_RECONFIG_RERUN = true",
        "STARTD_CRON_VMBUILD_KILL = true",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmbuild-probe",
        description="Print ClassAd lines for an HTCondor STARTD_CRON hook.")
    parser.add_argument("--condor-config", metavar="RUNNER", nargs="?", const="",
                        help="print the configuration that installs this probe instead "
                             "(RUNNER: path of the runner bundle on the node)")
    parser.add_argument("--no-kvm-check", action="store_true",
                        help="skip the (up to 10 s) KVM boot test; VMBUILD_KVM = false")
    args = parser.parse_args(argv)
    if args.condor_config is not None:
        runner = args.condor_config or (sys.argv[0] if sys.argv[0].endswith(".pyz")
                                        else "/opt/vmbuild/vmbuild-run.pyz")
        sys.stdout.write(condor_config_snippet(runner))
        return 0
    for line in probe_lines(check_kvm=not args.no_kvm_check):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
