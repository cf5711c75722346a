"""The execute-node probe: ClassAd lines saying whether this machine can run vmbuild VMs.

HTCondor runs it as a STARTD_CRON job and merges the lines into the machine ad; submit files
written by ``vmbuild submit`` match on them (``VMBUILD_QEMU =?= true || VMBUILD_VMWARE =?=
true``). Standard library only: it ships inside the runner bundle, and runs from it with
``PYTHONPATH=vmbuild-run.pyz python3 -m vmbuild.runner.probe``.

For VMware it says which product is installed (Workstation Pro, Player, Fusion), its version,
the highest ``virtualHW.version`` that version runs, and whether the host can run x86 guests
at all (Fusion on Apple silicon cannot): a VMware host refuses a VM whose hardware version is
newer than it knows, so the submit file's ``requirements`` compare these with the image's.
Everything is read without a GUI: ``vmware --version`` / ``vmplayer --version`` on Linux,
``/etc/vmware/config`` when those cannot run, and Fusion's ``Info.plist`` on macOS.
"""

from __future__ import annotations

import argparse
import os
import platform
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.runner import accel

RUNNER_VERSION: str
try:
    from vmbuild import __version__ as RUNNER_VERSION
except ImportError:  # pragma: no cover - a bundle built without vmbuild/__init__.py
    RUNNER_VERSION = "0+unknown"

__all__ = ["FUSION_APP", "RUNNER_VERSION", "VmwareProduct", "can_run_x86_guests",
           "classad_value", "condor_config_snippet", "detect_vmware", "main", "max_hw_version",
           "probe_attributes", "probe_lines", "qemu_version", "vmrun_host_type",
           "vmware_version"]

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
    """vmrun's own version, ``1.17.0 build-21139696``, from its banner (printed with its usage
    text). Not the product's version (see :func:`detect_vmware`): vmrun 1.17.0 ships with
    several Workstation and Fusion releases."""
    binary = binary or vmrun_binary()
    if binary is None:
        return None
    match = _VMRUN_VERSION_RE.search(_output([binary]))
    if not match:
        return "unknown"
    return f"{match.group(1)} build-{match.group(2)}" if match.group(2) else match.group(1)


#: Where Fusion lives; its Info.plist says its version (no GUI, no vmrun needed).
FUSION_APP = Path("/Applications/VMware Fusion.app")
#: Workstation's and Player's installer records the installed version here on Linux.
VMWARE_CONFIG = Path("/etc/vmware/config")

# The highest virtualHW.version each product release runs: (major, minor) -> version, the
# first release of a line that raised it. VMware's own table is KB 1003746 ("Virtual machine
# hardware versions"; Broadcom KB 315655 now), not reachable from here; what was checked:
#   * copies of that table in public notes (github.com/angieEncoded/notes
#     MISC/ESXiHardwareVersions.md, github.com/natthasath/gitbook
#     software/vmware/vmware-workstation-and-vmware-esxi-compatible.md): 19 = Workstation/Player
#     16.2.x, Fusion 12.2.x, ESXi 7.0 U2; 18 = Workstation/Player 16.x, Fusion 12.x;
#     16 = Workstation/Player 15.x, Fusion 11.x; 14 = Workstation/Player 14.x, Fusion 10.x;
#     12 = Workstation/Player 12.x, Fusion 8.x; 11 = Workstation 11, Player 7, Fusion 7;
#     10 = Workstation 10, Player 6, Fusion 6; 9 = 9/5/5; 8 = 8/4/4; 7 = 6.5-7/3/2-3.
#     (17 is ESXi 7.0 only: Workstation 15.1/15.5 stay at 16 in these copies.)
#   * vSphere's Hardware.Version enumeration (developer.broadcom.com, vsphere-automation-api
#     Vm_Hardware_Upgrade_RequestBody): 20 = ESXi 8.0, 21 = ESXi 8.0 U2; hosted products are
#     not named there.
#   * 20 for Workstation/Player 17.0 and Fusion 13.0, 21 for 17.5 and 13.5: from KB 1003746
#     as remembered, not re-read here (thin). Using 20 for 17.0-17.4 is the cautious side: a
#     hw-21 image is kept off a host that might refuse it, never sent to one.
#   * 22 for the calendar-versioned 25H2 releases: the Workstation Pro 25H2 release summary
#     ("virtual hardware version 22") and github.com/DrDonk/OC4VM issue 73 (17.6.4 runs 21,
#     25H2 writes 22). Thin; Fusion 25H2 assumed to match.
_WORKSTATION_HW: tuple[tuple[tuple[int, int], int], ...] = (
    ((25, 0), 22), ((17, 5), 21), ((17, 0), 20), ((16, 2), 19), ((16, 0), 18), ((15, 0), 16),
    ((14, 0), 14), ((12, 0), 12), ((11, 0), 11), ((10, 0), 10), ((9, 0), 9), ((8, 0), 8),
    ((6, 5), 7),
)
# Player was numbered apart from Workstation before 12 (Player 7 = Workstation 11).
_OLD_PLAYER_HW: tuple[tuple[tuple[int, int], int], ...] = (
    ((7, 0), 11), ((6, 0), 10), ((5, 0), 9), ((4, 0), 8), ((3, 0), 7),
)
_FUSION_HW: tuple[tuple[tuple[int, int], int], ...] = (
    ((25, 0), 22), ((13, 5), 21), ((13, 0), 20), ((12, 2), 19), ((12, 0), 18), ((11, 0), 16),
    ((10, 0), 14), ((8, 0), 12), ((7, 0), 11), ((6, 0), 10), ((5, 0), 9), ((4, 0), 8),
    ((2, 0), 7),
)
_PRODUCT_VERSION_RE = re.compile(
    r"VMware (Workstation|Player|Workstation Player)\s+(?:Pro\s+)?"
    r"(\d+(?:\.\d+)*|\d\dH\d)(?:\s+build-(\d+))?", re.I)
_CONFIG_VERSION_RE = re.compile(r'^\s*(workstation|player)\.product\.version\s*=\s*"([^"]+)"',
                                re.I | re.M)


@dataclass(frozen=True)
class VmwareProduct:
    """The VMware product on this host, as far as the probe can tell without a GUI.

    ``product`` is ``workstation``, ``player``, ``fusion`` or ``none``; ``max_hw`` is None
    when the version is not one the table knows (the submit file then does not match it).
    """

    product: str
    version: str | None = None
    build: str | None = None
    max_hw: int | None = None
    x86: bool = True

    @property
    def name(self) -> str:
        return {"workstation": "Workstation Pro", "player": "Workstation Player",
                "fusion": "Fusion", "none": "none"}.get(self.product, self.product)


def _version_key(version: str) -> tuple[int, int] | None:
    """``17.5.0`` -> (17, 5); ``25H2`` -> (25, 2); None when it is not a version."""
    if match := re.fullmatch(r"(\d\d)H(\d)", version.strip(), re.I):
        return int(match.group(1)), int(match.group(2))
    parts = re.findall(r"\d+", version)
    if not parts or not re.match(r"\d", version.strip()):
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def max_hw_version(product: str, version: str | None) -> int | None:
    """The highest virtualHW.version ``product`` at ``version`` runs (table above)."""
    key = _version_key(version) if version else None
    if key is None:
        return None
    if product == "fusion":
        table = _FUSION_HW
    elif product == "player" and key[0] < 12:
        table = _OLD_PLAYER_HW
    elif product in ("workstation", "player"):
        table = _WORKSTATION_HW
    else:
        return None
    return next((hw for first, hw in table if key >= first), None)


def can_run_x86_guests(system: str | None = None, machine: str | None = None) -> bool:
    """Whether VMware on this host can run an x86-64 guest (every vmbuild image is one).

    Workstation and Player exist only for x86-64 Windows and Linux hosts. Fusion runs x86
    guests on Intel Macs only: Fusion on Apple silicon runs Arm guests and no x86 guest at
    all. A Python running under Rosetta reports ``x86_64`` on an Apple-silicon Mac, so on
    macOS ``sysctl hw.optional.arm64`` is asked first (1 on Apple silicon, whatever the
    calling process's architecture).
    """
    system = system or platform.system()
    if system == "Darwin":
        if machine is None:
            if _output(["sysctl", "-n", "hw.optional.arm64"]).strip() == "1":
                return False
            machine = platform.machine()
        return machine.lower() not in ("arm64", "aarch64")
    machine = machine or platform.machine()
    return machine.lower() in ("x86_64", "amd64", "x64", "i686", "i386", "")


def _fusion(app: Path) -> VmwareProduct | None:
    try:
        with (app / "Contents" / "Info.plist").open("rb") as f:
            info = plistlib.load(f)
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None
    version = str(info.get("CFBundleShortVersionString") or "") or None
    build = str(info.get("CFBundleVersion") or "") or None
    return VmwareProduct("fusion", version, build, max_hw_version("fusion", version))


def _hosted_from_binaries(env_path: str | None) -> VmwareProduct | None:
    """``vmware --version`` (Workstation Pro) or ``vmplayer --version`` (Player) on Linux:
    ``VMware Workstation 17.5.0 build-22583795``. Both print and exit without a display."""
    for binary, product in (("vmware", "workstation"), ("vmplayer", "player")):
        path = shutil.which(binary, path=env_path)
        if path is None:
            continue
        match = _PRODUCT_VERSION_RE.search(_output([path, "--version"]))
        if match:
            version, build = match.group(2), match.group(3)
            return VmwareProduct(product, version, build, max_hw_version(product, version))
        return VmwareProduct(product)
    return None


def _hosted_from_config(config: Path) -> VmwareProduct | None:
    """``workstation.product.version = "17.5.0"`` in /etc/vmware/config (Linux installer)."""
    try:
        text = config.read_text(errors="replace")
    except OSError:
        return None
    found = {m.group(1).lower(): m.group(2) for m in _CONFIG_VERSION_RE.finditer(text)}
    for product in ("workstation", "player"):
        if product in found:
            version = found[product]
            return VmwareProduct(product, version, None, max_hw_version(product, version))
    return None


def detect_vmware(*, system: str | None = None, machine: str | None = None,
                  fusion_app: Path | None = None, vmware_config: Path | None = None,
                  env: Mapping[str, str] | None = None) -> VmwareProduct:
    """Which VMware product this host has, its version, its highest hardware version, and
    whether it runs x86 guests. ``product == "none"`` when there is none to be found.

    The keyword arguments stand in for the host (tests, and a caller that knows better);
    by default everything is read from this machine.
    """
    system = system or platform.system()
    fusion_app = fusion_app or FUSION_APP
    vmware_config = vmware_config or VMWARE_CONFIG
    x86 = can_run_x86_guests(system, machine)
    env_path = (env if env is not None else os.environ).get("PATH")
    found: VmwareProduct | None
    if system == "Darwin":
        found = _fusion(fusion_app)
    else:
        found = _hosted_from_binaries(env_path) or _hosted_from_config(vmware_config)
    if found is None:
        return VmwareProduct("none", x86=x86)
    return VmwareProduct(found.product, found.version, found.build, found.max_hw, x86)


def vmrun_host_type(product: VmwareProduct | None = None) -> str | None:
    """The ``vmrun -T`` type for this host's product: ``ws``, ``player`` or ``fusion``;
    None when there is no product or it cannot run an x86 guest (Fusion on Apple silicon),
    so a caller can refuse with a clear message instead of starting a VM that cannot run."""
    product = product or detect_vmware()
    if not product.x86:
        return None
    return {"workstation": "ws", "player": "player", "fusion": "fusion"}.get(product.product)


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
    vmrun = vmware_version()
    product = detect_vmware()
    # Usable means: vmrun to drive it, and a product that runs x86 guests.
    attrs["VMBUILD_VMWARE"] = vmrun is not None and product.x86
    if vmrun is not None:
        attrs["VMBUILD_VMRUN_VERSION"] = vmrun
    attrs["VMBUILD_VMWARE_PRODUCT"] = product.product
    attrs["VMBUILD_VMWARE_X86"] = product.x86
    if product.version is not None:
        attrs["VMBUILD_VMWARE_VERSION"] = product.version
    if product.max_hw is not None:
        attrs["VMBUILD_VMWARE_MAX_HWVERSION"] = product.max_hw
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
