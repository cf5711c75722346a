"""The VMware side of the artifact: write the image's ``.vmx`` and lint it, with the disks it
names (``vmbuild.vmdk`` reads those), before an image ships.

A broken image found on the build host costs a rebuild; found on a grid site it costs a
failed job on somebody else's machine with nobody there to read the error. So the lint
checks what VMware (and the QEMU backend, which reads the same ``.vmx``) would trip over:
missing keys, values out of range, hardware the declared virtual hardware version cannot
have, disk paths that break when the image is copied, and VMDKs that are truncated or
whose descriptor disagrees with their data, the usual result of an interrupted copy.

Beside the VMDK the stage writes its transport form, ``NAME.vmdk.zst``: what ``vmbuild
submit`` ships to every job start (:mod:`vmbuild.runner.transport` expands it on the
execute node). The plain ``.vmx`` + ``.vmdk`` stay for local use.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmbuild.recipe import Recipe
from vmbuild.runner.vmx import (
    SCSI_KINDS,
    UNIT_RANGES,
    VmxError,
    controller_present,
    dump_vmx,
    iter_vmx_lines,
    outside_files,
    parse_vmx,
    read_vmx_text,
    vmx_bool,
    vmx_disks,
)
from vmbuild.tools import run_tool
from vmbuild.vmdk import (
    SparseHeader,
    VmdkExtent,
    VmdkInfo,
    inspect_vmdk,
    lint_vmdk,
    path_problem,
)

__all__ = [
    "DISK_CONTROLLERS",
    "GUEST_OS_MIN_HW",
    "NIC_MODELS",
    "SERIAL_FILES",
    "SparseHeader",
    "VmdkExtent",
    "VmdkInfo",
    "compatibility_problems",
    "guest_os_problems",
    "inspect_vmdk",
    "lint_vmdk",
    "lint_vmx",
    "render_vmx",
    "write_transport",
]

MiB = 1024**2
SECTOR = 512

#: Controllers and NICs a recipe may ask for (RECIPE.md, ``output:``).
DISK_CONTROLLERS = ("pvscsi", "lsilogic", "sata", "nvme")
NIC_MODELS = ("vmxnet3", "e1000e", "e1000")
#: COM1, COM2, COM3 of the guest contract (ARCHITECTURE.md), as files beside the .vmx.
SERIAL_FILES = ("console.log", "job.log", "control.log")

KNOWN_NICS = frozenset({"vmxnet3", "e1000e", "e1000", "vlance", "vmxnet", "vmxnet2"})
KNOWN_CONNECTIONS = frozenset({"nat", "bridged", "hostonly", "custom"})
HW_MIN, HW_MAX = 4, 21
MEMSIZE_MAX = 1024 * 1024  # MiB: 1 TiB
VCPUS_MAX = 128

# The lowest virtualHW.version that has each device/feature (VMware's compatibility
# tables: hw 7 = ESX 4.0 / Workstation 6.5, 8 = ESXi 5.0 / WS 8, 10 = ESXi 5.5 / WS 10,
# 13 = ESXi 6.5 / WS 12.5).
_MIN_HW = {
    "pvscsi": 7,
    "lsisas1068": 7,
    "sata": 10,
    "nvme": 13,
    "vmxnet3": 7,
    "e1000e": 8,
    "efi": 8,
}


# The lowest virtualHW.version whose VMware products know each guestOS identifier: a host
# whose products top out below it treats the VM as an unknown guest (generic defaults; not
# verified here, VMware cannot run on these machines). The numbers come from the vSphere API's
# GuestOsIdentifier enumeration, whose entries say "Since vSphere API <release>", mapped to
# the hardware version that ESXi release introduced (6.5 -> 13, 7.0 -> 17, 7.0 U1 -> 18,
# 8.0 U1 -> 20); hosted products (Workstation/Fusion) add identifiers in the same generation.
#   debian10_64Guest     since 6.5 (as remembered; thin)
#   debian11_64Guest     since 7.0 (a Packer configuration found says "'debian11-64' requires
#                        ESXi 7.0 or later"; thin)
#   debian12_64Guest     since 8.0.0.1 = ESXi 8.0 U1 (Broadcom's 8.0u1 API listing has no
#                        debian12, the latest one has; almalinux/rocky arrived with it)
#   other4xLinux64Guest  since 6.5 (as remembered; thin)
#   other5xLinux64Guest  since 7.0.1.0 = ESXi 7.0 U1 (as remembered; thin)
# This makes the recipe default (virtualHW.version 19 with debian12-64) a VM that hosts of
# hardware generation 19 (Workstation 16.2, Fusion 12.2, ESXi 7.0 U2/U3) do not recognise,
# hence the check is opt-in in lint_vmx (strict_guest_os) until that default is settled.
GUEST_OS_MIN_HW: dict[str, int] = {
    "debian10-64": 13,
    "debian11-64": 17,
    "debian12-64": 20,
    "other4xlinux-64": 13,
    "other5xlinux-64": 18,
}
_API_SPELLING_RE = re.compile(r"(_64)?guest$|_", re.I)


def guest_os_problems(hardware_version: int, guest_os: str) -> list[str]:
    """Why VMware products of this hardware generation would not know ``guest_os``.

    Only the identifiers in :data:`GUEST_OS_MIN_HW` are judged; any other is taken as known.
    """
    minimum = GUEST_OS_MIN_HW.get(guest_os.strip().lower())
    if minimum is None or hardware_version >= minimum:
        return []
    family = re.sub(r"[\d.x-]+.*$", "", guest_os.strip().lower())  # "debian", "other"
    known = sorted((m, g) for g, m in GUEST_OS_MIN_HW.items() if m <= hardware_version)
    alike = [g for _, g in known if g.startswith(family)] or [g for _, g in known]
    instead = f", or guestOS {alike[-1]}" if alike else ""
    return [f"guestOS {guest_os!r} is known to VMware products of virtualHW.version "
            f"{minimum} and later, but the VM has version {hardware_version}: hosts of that "
            f"generation would run it as an unknown guest (use virtualHW.version {minimum}"
            f"{instead})"]


def _is_64bit(guest_os: str) -> bool:
    """VMware's 64-bit guest OS identifiers all end in ``-64`` (``debian12-64``)."""
    return guest_os.lower().endswith("-64")


def compatibility_problems(
    hardware_version: int,
    guest_os: str,
    firmware: str,
    controllers: Iterable[str],
    nics: Iterable[str] = (),
) -> list[str]:
    """Why this combination cannot run under VMware; empty when it can.

    Shared by :func:`render_vmx` (refuse to write it) and :func:`lint_vmx` (report it).
    """
    controllers = list(controllers)
    problems: list[str] = []
    wanted = [("efi firmware", "efi")] if firmware == "efi" else []
    wanted += [(f"the {c} disk controller", c) for c in sorted(set(controllers))]
    wanted += [(f"the {n} network adapter", n) for n in sorted(set(nics))]
    for label, feature in wanted:
        minimum = _MIN_HW.get(feature)
        if minimum is not None and hardware_version < minimum:
            problems.append(
                f"{label} needs virtualHW.version {minimum} or later, "
                f"but the VM has version {hardware_version}"
            )
    if "nvme" in controllers and not _is_64bit(guest_os):
        problems.append(
            f"guestOS {guest_os!r} is a 32-bit guest type; VMware offers NVMe only to "
            "64-bit guests (use an identifier ending in -64)"
        )
    return problems


# --------------------------------------------------------------------------- .vmx writing


def render_vmx(recipe: Recipe, vmdk_name: str) -> str:
    """The ``.vmx`` text for the image built from ``recipe``, whose disk is ``vmdk_name``.

    The disk and the three serial-port files are named relative to the ``.vmx`` so the
    image directory can be copied anywhere. The serial ports are the guest contract:
    COM1 console, COM2 job output, COM3 control channel; ``yieldOnMsrRead`` stops a guest
    polling the port from spinning a host CPU. A NIC is present only when the job asked
    for network: a job VM without one cannot reach anything, which is the safe default.
    ``pciBridge*`` entries are the PCIe root ports VMware itself writes for PCIe devices
    (PVSCSI, vmxnet3, NVMe) from hardware version 7 on.

    Raises ValueError when the recipe asks for something VMware cannot do (the recipe
    loader should have refused it first; this is the last line of defence).
    """
    out, guest = recipe.output, recipe.guest
    problems: list[str] = []
    if out.disk_controller not in DISK_CONTROLLERS:
        problems.append(f"output.disk_controller {out.disk_controller!r} is not one of "
                        f"{', '.join(DISK_CONTROLLERS)}")
    if recipe.job.network and out.nic not in NIC_MODELS:
        problems.append(f"output.nic {out.nic!r} is not one of {', '.join(NIC_MODELS)}")
    if guest.firmware not in ("bios", "efi"):
        problems.append(f"guest.firmware {guest.firmware!r} is not bios or efi")
    if not HW_MIN <= out.hardware_version <= HW_MAX:
        problems.append(f"output.hardware_version {out.hardware_version} is outside "
                        f"{HW_MIN}..{HW_MAX}")
    if guest.memory % (4 * MiB) or not 4 <= guest.memory // MiB <= MEMSIZE_MAX:
        problems.append(f"guest.memory {guest.memory} bytes is not a multiple of 4 MiB "
                        "between 4 MiB and 1 TiB (VMware's rule)")
    if not 1 <= guest.cpus <= VCPUS_MAX:
        problems.append(f"guest.cpus {guest.cpus} is outside 1..{VCPUS_MAX}")
    if not _plain_file_name(vmdk_name) or not vmdk_name.lower().endswith(".vmdk"):
        problems.append(f"the disk name {vmdk_name!r} must be a plain file name ending .vmdk")
    nics = [out.nic] if recipe.job.network else []
    problems += compatibility_problems(
        out.hardware_version, out.guest_os, guest.firmware, [out.disk_controller], nics
    )
    if problems:
        raise ValueError(f"cannot write a .vmx for recipe {recipe.name!r}: " + "; ".join(problems))

    vmx: dict[str, str | int | bool] = {
        "config.version": "8",
        "virtualHW.version": out.hardware_version,
        "displayName": recipe.name,
        "guestOS": out.guest_os,
    }
    if guest.firmware == "efi":
        vmx["firmware"] = "efi"
    vmx["memsize"] = guest.memory // MiB
    vmx["numvcpus"] = guest.cpus
    if out.hardware_version >= 7:
        vmx["pciBridge0.present"] = True
        for n in range(4, 8):
            vmx[f"pciBridge{n}.present"] = True
            vmx[f"pciBridge{n}.virtualDev"] = "pcieRootPort"
            vmx[f"pciBridge{n}.functions"] = 8
    prefix = {"pvscsi": "scsi0", "lsilogic": "scsi0"}.get(out.disk_controller,
                                                         f"{out.disk_controller}0")
    vmx[f"{prefix}.present"] = True
    if prefix == "scsi0":
        vmx["scsi0.virtualDev"] = out.disk_controller
    vmx[f"{prefix}:0.present"] = True
    vmx[f"{prefix}:0.fileName"] = vmdk_name
    if recipe.job.network:
        vmx["ethernet0.present"] = True
        vmx["ethernet0.virtualDev"] = out.nic
        vmx["ethernet0.connectionType"] = "nat"
        vmx["ethernet0.addressType"] = "generated"
    for index, name in enumerate(SERIAL_FILES):
        vmx[f"serial{index}.present"] = True
        vmx[f"serial{index}.fileType"] = "file"
        vmx[f"serial{index}.fileName"] = name
        vmx[f"serial{index}.yieldOnMsrRead"] = True
    vmx["floppy0.present"] = False
    vmx["tools.syncTime"] = False
    vmx["vmbuild.recipe"] = recipe.name
    return dump_vmx(vmx)


# ---------------------------------------------------------------------- transport form

#: zstd's settings for the transport form. Measured on examples/hello's monolithicSparse
#: VMDK (302 MiB; zstd 1.5.4, -T0, 2 cores; CPU seconds, size):
#:     -3                1.5 s   90.4 MiB
#:     -6  --long=27     5.2 s   83.4 MiB
#:     -9  --long=27     8.1 s   80.3 MiB   <- chosen
#:     -12 --long=27    21   s   78.5 MiB
#:     -15 --long=27    67   s   78.2 MiB
#:     -19 --long=27   222   s   70.6 MiB
#: -15 would cost every build a minute (issue 9 wants a warm build within 40 s) for 2.7 %
#: fewer bytes; expanding takes 0.7-1.4 s at any level. --long=27 (a 128 MiB window) finds
#: the repeats a disk has far apart and stays within zstd -d's default memory limit, so the
#: runner expands without flags. (With it zstd compresses this file on one core; without
#: it, -9 uses both but writes 81.9 MiB.)
TRANSPORT_ZSTD = ("-9", "--long=27")


def write_transport(vmdk: Path) -> dict[str, Any]:
    """Write ``vmdk``'s transport form, ``NAME.vmdk.zst``, beside it; return the manifest's
    record of it (its size and SHA-256 are in the manifest's ``files`` with the VMDK's).

    Written under a temporary name and renamed: the build's staging directory is published
    as a whole, so no half-written ``.zst`` ever reaches an image directory either way."""
    target = vmdk.with_name(vmdk.name + ".zst")
    tmp = target.with_name(f".{target.name}.tmp")
    started = time.monotonic()
    try:
        run_tool(["zstd", "-q", "-f", "-T0", *TRANSPORT_ZSTD, "-o", str(tmp), str(vmdk)],
                 "compressing the disk's transport form")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": target.name, "disk": vmdk.name, "zstd": " ".join(TRANSPORT_ZSTD),
            "size": target.stat().st_size, "seconds": round(time.monotonic() - started, 1)}


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


# --------------------------------------------------------------------------- .vmx linting

_REQUIRED = (".encoding", "config.version", "virtualhw.version", "guestos", "memsize", "numvcpus")
_DEVICE_PRESENT_RE = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.present$")
# Any "<word><n>:<m>.fileName": a disk named under a device key, known or not.
_ANY_DEVICE_FILE_RE = re.compile(r"^([a-z_]+?)(\d+):(\d+)\.filename$")
_SCSI_PRESENT_RE = re.compile(r"^scsi(\d+)\.present$")
_NIC_PRESENT_RE = re.compile(r"^ethernet(\d+)\.present$")
_SERIAL_PRESENT_RE = re.compile(r"^serial(\d+)\.present$")
_ORIGINAL_CASE = {
    "virtualhw.version": "virtualHW.version",
    "guestos": "guestOS",
    "config.version": "config.version",
}


def _whole(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


def lint_vmx(
    path: str | Path, *, qemu_img: str | None = "qemu-img", timeout: float = 120.0,
    strict_guest_os: bool = False,
) -> list[str]:
    """Problems with a ``.vmx`` and the disks it names (empty = fine to ship).

    Each problem is a sentence naming the file and the key. Checked: the file parses;
    no key is set twice; the required keys are there; virtualHW.version, memsize and
    numvcpus are in VMware's ranges; there is a disk, its controller is present and of a
    known kind, its unit is one the controller has, and its file exists beside the ``.vmx``
    under a relative path; no disk is named where VMware would silently not attach it (an
    unknown device key such as ``lsilogic0:1``, an absent controller, no ``.present``); the hardware
    version supports the controllers, NICs and firmware; ``guestOS`` is written as a
    ``.vmx`` takes it (``debian12-64``, not the vSphere API's ``debian12_64Guest``, which
    VMware's .vmx reader does not know); with ``strict_guest_os``, the hardware version is
    one whose VMware products know that guestOS (:func:`guest_os_problems`); serial port
    files are relative; no disk, serial file, NVRAM or descriptor extent is a symbolic link
    leading out of the image directory (the runner refuses those, exit 2); then every VMDK
    is linted with :func:`lint_vmdk`.
    """
    path = Path(path)
    name = path.name
    try:
        text, encoding = read_vmx_text(path)
        lines = list(iter_vmx_lines(text, encoding))
        vmx = parse_vmx(text, encoding)
    except OSError as exc:
        return [f"{name}: cannot be read: {exc.strerror or exc}"]
    except VmxError as exc:
        return [f"{name}: {exc}"]
    problems: list[str] = []

    first_seen: dict[str, int] = {}
    for entry in lines:
        lower = entry.key.lower()
        if lower in first_seen:
            problems.append(f"{name}: {entry.key} is set twice (lines {first_seen[lower]} and "
                            f"{entry.line}); VMware keeps only the last")
        else:
            first_seen[lower] = entry.line
    for key in _REQUIRED:
        if key not in vmx:
            problems.append(f"{name}: {_ORIGINAL_CASE.get(key, key)} is missing")

    if (version := vmx.get("config.version")) is not None and version.strip() != "8":
        problems.append(f"{name}: config.version is {version!r}; VMware expects \"8\"")
    hw = _whole(vmx.get("virtualhw.version"))
    if "virtualhw.version" in vmx and (hw is None or not HW_MIN <= hw <= HW_MAX):
        problems.append(f"{name}: virtualHW.version {vmx['virtualhw.version']!r} is not a "
                        f"hardware version between {HW_MIN} and {HW_MAX}")
        hw = None
    memsize = _whole(vmx.get("memsize"))
    if "memsize" in vmx and (memsize is None or not 4 <= memsize <= MEMSIZE_MAX or memsize % 4):
        problems.append(f"{name}: memsize {vmx['memsize']!r} is not a multiple of 4 MiB "
                        f"between 4 and {MEMSIZE_MAX}")
    cpus = _whole(vmx.get("numvcpus"))
    if "numvcpus" in vmx and (cpus is None or not 1 <= cpus <= VCPUS_MAX):
        problems.append(f"{name}: numvcpus {vmx['numvcpus']!r} is not between 1 and {VCPUS_MAX}")
    firmware = vmx.get("firmware", "bios").strip().lower()
    if firmware not in ("bios", "efi"):
        problems.append(f"{name}: firmware {vmx['firmware']!r} is not \"bios\" or \"efi\"")

    # Disk controllers and disks.
    for key, value in vmx.items():
        if (match := _SCSI_PRESENT_RE.match(key)) and vmx_bool(value):
            dev = vmx.get(f"scsi{match.group(1)}.virtualdev")
            if dev is None:
                problems.append(f"{name}: scsi{match.group(1)}.virtualDev is missing; VMware "
                                "would pick a controller by guest type")
            elif dev.lower() not in SCSI_KINDS:
                problems.append(f"{name}: scsi{match.group(1)}.virtualDev {dev!r} is not a "
                                f"known SCSI controller ({', '.join(sorted(SCSI_KINDS))})")
        elif (match := _DEVICE_PRESENT_RE.match(key)) and vmx_bool(value):
            prefix, bus, unit = match.group(1), int(match.group(2)), int(match.group(3))
            dev = f"{prefix}{bus}:{unit}"
            if not controller_present(vmx, prefix, bus):
                problems.append(f"{name}: {dev} is present but its controller {prefix}{bus} "
                                "is not")
            units, reserved = UNIT_RANGES[prefix]
            if prefix == "scsi" and unit in reserved:
                problems.append(f"{name}: {dev}: SCSI unit 7 is the controller's own ID")
            elif unit not in units:
                problems.append(f"{name}: {dev}: {prefix} controllers have units "
                                f"{units.start}-{units.stop - 1} only")
            if not vmx.get(f"{dev}.filename"):
                problems.append(f"{name}: {dev}.fileName is missing")
        elif match := _ANY_DEVICE_FILE_RE.match(key):
            # A disk VMware will not attach: it ignores keys it does not know, and a device
            # without "present" or on an absent controller, silently. The job then runs
            # without that disk (its inputs, its outputs: lost), so this is an error.
            prefix, bus = match.group(1), int(match.group(2))
            dev = key[: -len(".filename")]
            original = next((e.key for e in lines if e.key.lower() == key), key)
            if prefix not in UNIT_RANGES:
                problems.append(
                    f"{name}: {original} names a disk under {original.split('.')[0]!r}, "
                    "which is not a device key VMware knows (disks are scsiN:M for every SCSI "
                    "kind, sataN:M, nvmeN:M, ideN:M); VMware would ignore it silently")
            elif vmx_bool(vmx.get(f"{dev}.present")):
                pass  # a present device: checked above, with its .present key
            elif not controller_present(vmx, prefix, bus):
                problems.append(f"{name}: {original} names a disk on {prefix}{bus}, a "
                                "controller that is not present; VMware would not attach it")
            elif "cdrom" not in vmx.get(f"{dev}.devicetype", "").lower():
                problems.append(f"{name}: {original} names a disk but {dev}.present is not "
                                "TRUE; VMware would not attach it")
    disks = vmx_disks(vmx)
    if not disks:
        problems.append(f"{name}: the VM has no hard disk (no present scsi/sata/nvme/ide disk "
                        "with a fileName)")
    vmdks: list[Path] = []
    for disk in disks:
        key = f"{disk.key}.fileName"
        why = path_problem(disk.file_name)
        if why is not None:
            problems.append(f"{name}: {key} {why}")
            continue
        disk_path = path.parent / disk.file_name
        if not disk_path.is_file():
            problems.append(f"{name}: {key} {disk.file_name!r} does not exist next to {name}")
        elif disk.file_name.lower().endswith(".vmdk"):
            vmdks.append(disk_path)

    # NICs and serial ports.
    nics: list[str] = []
    for key, value in vmx.items():
        if (match := _NIC_PRESENT_RE.match(key)) and vmx_bool(value):
            n = match.group(1)
            dev = vmx.get(f"ethernet{n}.virtualdev", "").strip().lower()
            if dev and dev not in KNOWN_NICS:
                problems.append(f"{name}: ethernet{n}.virtualDev {dev!r} is not a known "
                                f"adapter ({', '.join(sorted(KNOWN_NICS))})")
            elif dev:
                nics.append(dev)
            conn = vmx.get(f"ethernet{n}.connectiontype", "").strip().lower()
            if conn and conn not in KNOWN_CONNECTIONS:
                problems.append(f"{name}: ethernet{n}.connectionType {conn!r} is not one of "
                                f"{', '.join(sorted(KNOWN_CONNECTIONS))}")
        elif (match := _SERIAL_PRESENT_RE.match(key)) and vmx_bool(value):
            n = match.group(1)
            if vmx.get(f"serial{n}.filetype", "").strip().lower() == "file":
                file_name = vmx.get(f"serial{n}.filename", "")
                why = path_problem(file_name)
                if why is not None:
                    problems.append(f"{name}: serial{n}.fileName {why}")

    guest_os = vmx.get("guestos", "other")
    if _API_SPELLING_RE.search(guest_os.strip()):
        problems.append(f"{name}: guestOS {guest_os!r} is spelt as the vSphere API spells "
                        "guest ids; a .vmx takes VMware's own identifiers (debian12-64, "
                        "other5xlinux-64), and VMware would not recognise this one")
    if hw is not None:
        kinds = [disk.controller for disk in disks]
        problems += [f"{name}: {p}" for p in compatibility_problems(hw, guest_os, firmware,
                                                                      kinds, nics)]
        if strict_guest_os:
            problems += [f"{name}: {p}" for p in guest_os_problems(hw, guest_os)]

    # Names that look relative but are symbolic links leading out of the image directory:
    # the runner refuses them (outside_files); absolute and '..' names are reported above.
    problems += [p for p in outside_files(path, vmx) if "symbolic link" in p]

    for vmdk in vmdks:
        problems += lint_vmdk(vmdk, qemu_img=qemu_img, timeout=timeout)
    return problems
