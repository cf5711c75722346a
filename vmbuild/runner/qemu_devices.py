"""Translate a VMware machine (its :class:`~vmbuild.runner.vmx.VmxInfo`) into QEMU devices.

Standard library only (ships in the runner zipapp). The QEMU backend does not keep its own
description of the VM: it reads the image's ``.vmx`` and asks this module for the
``qemu-system-x86_64`` arguments that give the guest the same hardware it has under
VMware: same disk controller, same NIC model, same serial ports in the same order, same
firmware. The guest image is built once and must boot unchanged on both, so the device
names the guest kernel sees (``/dev/sda`` on PVSCSI, ``/dev/nvme0n1`` on NVMe, ``ttyS1`` for
the job's output, ``ens*`` on vmxnet3) must not depend on the backend.

Mapping, and where QEMU can only come close:

=================  =============================================================
VMware             QEMU
=================  =============================================================
pvscsi             ``pvscsi`` + ``scsi-hd`` (same device, same Linux driver)
lsilogic           ``lsi53c895a`` + ``scsi-hd``: QEMU has no LSI53C1030 (Linux
                   ``mptspi``); the LSI53C895A (``sym53c8xx``) is the nearest
                   emulation, so the guest needs that driver too
lsisas1068         ``mptsas1068`` (the same chip family, Linux ``mptsas``)
sata               ``ich9-ahci`` + ``ide-hd`` on its ports
nvme               one ``nvme`` device per disk
ide                the i440fx machine's built-in PIIX IDE + ``ide-hd``
vmxnet3/e1000e/    ``vmxnet3`` / ``e1000e`` / ``e1000`` (``vlance`` -> ``pcnet``)
e1000
serialN file       ``-chardev file`` + ``-serial chardev:...``, COM1 first
firmware efi       ``-bios OVMF.fd`` (the combined image; no persistent NVRAM,
                   which a run-once job VM does not need)
=================  =============================================================

The machine type is ``pc`` (i440fx): every controller above is a PCI device that works on
it, SeaBIOS boots from all of them, and it is the machine QEMU's own VMware conversions
use. No ``-cpu`` is given, so the default model is used: a checkpoint taken on one node
must resume on another, which ``-cpu host`` would prevent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from .vmx import VmxDisk, VmxInfo

__all__ = [
    "BLOCKDEV",
    "OVMF_CANDIDATES",
    "ExtraDrive",
    "find_ovmf",
    "guess_format",
    "qemu_argv",
    "qemu_opt_escape",
]

#: Combined (code + vars) OVMF images usable with ``-bios``, most common first.
OVMF_CANDIDATES = (
    "/usr/share/ovmf/OVMF.fd",  # Debian, Ubuntu (package ovmf)
    "/usr/share/qemu/OVMF.fd",  # Debian/Ubuntu compatibility link
    "/usr/share/OVMF/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF.fd",
    "/usr/share/edk2-ovmf/OVMF.fd",
)

#: Format name meaning "path is the node-name of a -blockdev the caller adds itself" (the
#: runner builds its qcow2 layer chains explicitly so that it, not the files, names backings).
BLOCKDEV = "blockdev"

_FORMATS = {".vmdk": "vmdk", ".qcow2": "qcow2", ".img": "raw", ".raw": "raw", ".iso": "raw"}

_NIC_MODELS = {"vmxnet3": "vmxnet3", "e1000e": "e1000e", "e1000": "e1000", "vlance": "pcnet"}

# QEMU device per SCSI virtualDev, and how many targets its bus takes.
_SCSI_MODELS = {"pvscsi": "pvscsi", "lsilogic": "lsi53c895a", "lsisas1068": "mptsas1068"}
_SCSI_TARGETS = {"pvscsi": 64, "lsi53c895a": 7, "mptsas1068": 8}
_AHCI_PORTS = 6  # ich9-ahci
_MAX_SERIAL = 4  # COM1..COM4 on the ISA bus


class ExtraDrive(NamedTuple):
    """A disk the runner adds to the VM (job inputs, job outputs), on the boot disk's
    controller. ``read_only`` protects the host file (inputs)."""

    path: str
    format: str
    read_only: bool = False


def qemu_opt_escape(value: str) -> str:
    """Escape a value for a QEMU ``-opt key=value,...`` list: a comma is written twice.

    Without this a path such as ``/data/run,1/disk.qcow2`` would be split into options.
    """
    return value.replace(",", ",,")


def find_ovmf() -> str | None:
    """The first OVMF image that exists (``$VMBUILD_OVMF`` first), or None.

    Only combined images are looked for: they work with plain ``-bios``, whereas split
    CODE/VARS images need pflash drives and a writable VARS copy per run.
    """
    candidates = [os.environ.get("VMBUILD_OVMF", ""), *OVMF_CANDIDATES]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def guess_format(path: str) -> str:
    """QEMU block format from the file extension. Always passed explicitly, because letting
    QEMU probe a raw image lets the guest turn it into something else (a known hole)."""
    suffix = Path(path).suffix.lower()
    try:
        return _FORMATS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the disk format of {path!r} from its extension; "
            "give it explicitly (e.g. in disk_override as (path, format))"
        ) from None


class _Bus:
    """Tracks one QEMU controller's free slots so extra drives land after the VMX disks."""

    def __init__(self, kind: str, qemu_id: str, bus: int) -> None:
        self.kind = kind
        self.qemu_id = qemu_id
        self.bus = bus
        self.used: set[int] = set()


def _drive(path: str, fmt: str, node: str, read_only: bool, ata: bool) -> list[str]:
    """A ``-drive`` for a device added separately. QEMU's ATA disks (``ide-hd``) refuse a
    read-only drive, so there "read-only" means ``snapshot=on``: the guest may write, but
    into a throwaway overlay, and the host file stays untouched, which is the point."""
    if fmt == BLOCKDEV:
        return []
    spec = f"file={qemu_opt_escape(path)},format={fmt},if=none,id={node}"
    if read_only:
        spec += ",snapshot=on" if ata else ",readonly=on"
    return ["-drive", spec]


def _resolve(
    disk: VmxDisk, vmx_dir: Path, override: Mapping[str, str | tuple[str, str]] | None
) -> tuple[str, str]:
    chosen: str | tuple[str, str] | None = None
    if override:
        chosen = override.get(disk.file_name)
        if chosen is None:
            chosen = override.get(Path(disk.file_name).name)
    if chosen is None:
        path = str(vmx_dir / disk.file_name)
        return path, guess_format(path)
    if isinstance(chosen, tuple):
        return chosen
    return chosen, guess_format(chosen)


def qemu_argv(
    info: VmxInfo,
    vmx_dir: Path,
    *,
    disk_override: Mapping[str, str | tuple[str, str]] | None = None,
    serial_paths: Sequence[str] | None = None,
    extra_drives: Sequence[ExtraDrive | tuple[str, str]] = (),
    accel: str = "tcg",
    ovmf_path: str | None = None,
) -> list[str]:
    """The ``qemu-system-x86_64`` arguments (without the program) for the VM in ``info``.

    ``vmx_dir``: the directory the ``.vmx`` is in; relative disk file names are resolved
    against it. ``disk_override`` maps a disk's file name as written in the ``.vmx`` to the
    file to use instead (e.g. the runner's qcow2 layer over the VMDK), optionally as a
    ``(path, format)`` pair; otherwise the format comes from the extension. The format
    :data:`BLOCKDEV` makes ``path`` the node name of a ``-blockdev`` the caller adds.
    ``serial_paths`` gives COM1, COM2, ... in order: a host file path, or a raw chardev
    backend spec prefixed with ``chardev:`` (``chardev:socket,path=/run/x.sock,server=on``).
    When None, the ``.vmx``'s own file-backed serial ports are used (relative to
    ``vmx_dir``) at their COM numbers. ``extra_drives`` are attached after the VMX disks on
    the boot disk's controller (separate NVMe controllers for NVMe). ``ovmf_path`` is used
    for EFI guests; None means :func:`find_ovmf`.

    Nothing about the monitor, QMP, ``-no-reboot`` or migration is added: that is runner
    policy, appended by the caller. Raises ValueError for hardware QEMU cannot reproduce.
    """
    argv: list[str] = ["-machine", "pc", "-accel", accel, "-m", f"{info.memory_mib}M",
                       "-smp", str(info.cpus), "-nodefaults", "-no-user-config",
                       "-display", "none"]
    if info.firmware == "efi":
        firmware = ovmf_path or find_ovmf()
        if firmware is None:
            raise ValueError(
                "the VM uses EFI firmware but no OVMF image was found "
                f"(looked for {', '.join(OVMF_CANDIDATES)}; set VMBUILD_OVMF)"
            )
        argv += ["-bios", firmware]

    if not info.disks:
        raise ValueError("the VM has no hard disk")

    buses: dict[tuple[str, int], _Bus] = {}
    node_count = 0
    nvme_count = 0

    def attach(disk_kind: str, bus_no: int, unit: int | None, path: str, fmt: str,
               read_only: bool, boot: bool) -> None:
        """Add one drive and its device; the first disk of the VMX is the boot disk."""
        nonlocal node_count, nvme_count
        if fmt == BLOCKDEV:  # a node the caller defines itself with -blockdev
            node = path
        else:
            node = f"disk{node_count}"
            node_count += 1
        boot_opt = ",bootindex=0" if boot else ""
        if disk_kind == "nvme":
            argv.extend(_drive(path, fmt, node, read_only, ata=False))
            serial = f"vmbuild{nvme_count}"
            device = f"nvme,id=nvme{nvme_count},serial={serial},drive={node}{boot_opt}"
            argv.extend(["-device", device])
            nvme_count += 1
            return
        key = (disk_kind, 0 if disk_kind == "ide" else bus_no)  # ide0 and ide1: one PIIX
        bus = buses.get(key)
        if bus is None:
            bus = _new_bus(disk_kind, bus_no, argv)
            buses[key] = bus
        slot = _pick_slot(bus, unit)
        argv.extend(_drive(path, fmt, node, read_only, ata=bus.kind in ("ahci", "ide")))
        if bus.kind in _SCSI_TARGETS:
            argv.extend(["-device", f"scsi-hd,bus={bus.qemu_id}.0,scsi-id={slot},lun=0,"
                         f"drive={node}{boot_opt}"])
        elif bus.kind == "ahci":
            argv.extend(["-device", f"ide-hd,bus={bus.qemu_id}.{slot},drive={node}{boot_opt}"])
        else:  # PIIX IDE: slot = 2 * channel + master/slave
            argv.extend(["-device", f"ide-hd,bus=ide.{slot // 2},unit={slot % 2},"
                         f"drive={node}{boot_opt}"])

    for position, disk in enumerate(info.disks):
        path, fmt = _resolve(disk, vmx_dir, disk_override)
        unit = disk.unit if disk.controller != "ide" else disk.bus * 2 + disk.unit
        attach(disk.controller, disk.bus, unit, path, fmt, False, position == 0)

    boot = info.disks[0]
    for extra in extra_drives:
        drive = extra if isinstance(extra, ExtraDrive) else ExtraDrive(*extra)
        attach(boot.controller, boot.bus, None, drive.path, drive.format, drive.read_only, False)

    for nic in info.nics:
        model = _NIC_MODELS.get(nic.virtual_dev)
        if model is None:
            raise ValueError(f"ethernet{nic.number}: QEMU has no emulation of {nic.virtual_dev!r}")
        netdev = f"user,id=net{nic.number}"
        if nic.connection_type == "hostonly":
            netdev += ",restrict=on"  # host-only: no way out of the host, as under VMware
        argv += ["-netdev", netdev, "-device", f"{model},netdev=net{nic.number}"]

    argv += _serial_args(info, vmx_dir, serial_paths)
    return argv


def _new_bus(kind: str, bus_no: int, argv: list[str]) -> _Bus:
    if kind in _SCSI_MODELS:
        model = _SCSI_MODELS[kind]
        bus = _Bus(model, f"scsi{bus_no}", bus_no)
        argv += ["-device", f"{model},id={bus.qemu_id}"]
        return bus
    if kind == "sata":
        bus = _Bus("ahci", f"sata{bus_no}", bus_no)
        argv += ["-device", f"ich9-ahci,id={bus.qemu_id}"]
        return bus
    if kind == "ide":
        return _Bus("ide", "ide", 0)
    raise ValueError(f"QEMU has no emulation of the {kind!r} disk controller")


def _pick_slot(bus: _Bus, wanted: int | None) -> int:
    if bus.kind in _SCSI_TARGETS:
        limit = _SCSI_TARGETS[bus.kind]
    elif bus.kind == "ahci":
        limit = _AHCI_PORTS
    else:
        limit = 4
    if wanted is None:
        wanted = next((n for n in range(limit) if n not in bus.used), limit)
    if wanted >= limit:
        raise ValueError(f"{bus.qemu_id}: no free slot for another disk ({bus.kind} has {limit})")
    if wanted in bus.used:
        raise ValueError(f"{bus.qemu_id}: two disks on slot {wanted}")
    bus.used.add(wanted)
    return wanted


def _serial_args(info: VmxInfo, vmx_dir: Path, serial_paths: Sequence[str] | None) -> list[str]:
    specs: list[str | None]
    if serial_paths is None:
        top = max((port.number for port in info.serial_ports), default=-1)
        specs = [None] * (top + 1)
        for port in info.serial_ports:
            if port.file_type == "file" and port.file_name:
                specs[port.number] = str(vmx_dir / port.file_name)
    else:
        specs = list(serial_paths)
    if len(specs) > _MAX_SERIAL:
        raise ValueError(f"{len(specs)} serial ports asked for; the PC has {_MAX_SERIAL}")
    args: list[str] = []
    for index, spec in enumerate(specs):
        chardev = f"serial{index}"
        if spec is None:
            # Keeps later ports on their COM numbers: ttyS2 must stay ttyS2.
            backend = f"null,id={chardev}"
        elif spec.startswith("chardev:"):
            backend = f"{spec[len('chardev:') :]},id={chardev}"
        else:
            backend = f"file,id={chardev},path={qemu_opt_escape(spec)}"
        args += ["-chardev", backend, "-serial", f"chardev:{chardev}"]
    return args
