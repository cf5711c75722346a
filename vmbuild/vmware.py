"""The VMware side of the artifact: write the image's ``.vmx``, inspect ``.vmdk`` files, and
lint both before an image ships.

A broken image found on the build host costs a rebuild; found on a grid site it costs a
failed job on somebody else's machine with nobody there to read the error. So the lint
checks what VMware (and the QEMU backend, which reads the same ``.vmx``) would trip over:
missing keys, values out of range, hardware the declared virtual hardware version cannot
have, disk paths that break when the image is copied, and VMDKs that are truncated or
whose descriptor disagrees with their data, the usual result of an interrupted copy.

The VMDK structures follow VMware's "Virtual Disk Format 5.0" specification: a sparse
extent starts with a 512-byte little-endian ``SparseExtentHeader`` (magic ``KDMV``); its
grain directory (GD) points to grain tables (GTs) of ``numGTEsPerGT`` 32-bit sector
offsets, each locating one grain of ``grainSize`` sectors. A streamOptimized extent
compresses each grain behind a 12-byte marker (LBA, compressed size) and may keep its GD at
the end of the file, found through a footer (a copy of the header) before the
end-of-stream marker.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from vmbuild.recipe import Recipe
from vmbuild.runner.vmx import (
    SCSI_KINDS,
    VmxError,
    controller_present,
    dump_vmx,
    iter_vmx_lines,
    parse_vmx,
    read_vmx_text,
    vmx_bool,
    vmx_disks,
)

__all__ = [
    "DISK_CONTROLLERS",
    "NIC_MODELS",
    "SERIAL_FILES",
    "SparseHeader",
    "VmdkExtent",
    "VmdkInfo",
    "compatibility_problems",
    "inspect_vmdk",
    "lint_vmdk",
    "lint_vmx",
    "render_vmx",
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


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _path_problem(name: str) -> str | None:
    """Why a file name written in a .vmx/.vmdk breaks when the image is copied, or None."""
    if not name:
        return "is empty"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or (
        PureWindowsPath(name).drive
    ):
        return f"{name!r} is an absolute path; the image breaks when it is copied elsewhere"
    if ".." in re.split(r"[\\/]", name):
        return f"{name!r} leaves the image directory ('..'); the image must be self-contained"
    return None


# --------------------------------------------------------------------------- VMDK reading

MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_TEST = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # SparseExtentHeader without its padding
_MARKER_EOS, _MARKER_GT, _MARKER_GD, _MARKER_FOOTER = 0, 1, 2, 3
_DESCRIPTOR_MAGIC = "# Disk DescriptorFile"
_MAX_DESCRIPTOR = 1 * MiB

# createType -> extent type its extents must have; "embedded" ones keep the descriptor
# inside the sparse extent file itself.
_CREATE_TYPES: dict[str, tuple[frozenset[str], bool]] = {
    "monolithicSparse": (frozenset({"SPARSE"}), True),
    "streamOptimized": (frozenset({"SPARSE"}), True),
    "monolithicFlat": (frozenset({"FLAT"}), False),
    "twoGbMaxExtentSparse": (frozenset({"SPARSE", "ZERO"}), False),
    "twoGbMaxExtentFlat": (frozenset({"FLAT", "ZERO"}), False),
    "vmfs": (frozenset({"VMFS"}), False),
    "vmfsSparse": (frozenset({"VMFSSPARSE"}), False),
    "vmfsThin": (frozenset({"VMFS"}), False),
    "seSparse": (frozenset({"SESPARSE"}), False),
    "vmfsRaw": (frozenset({"VMFSRAW"}), False),
    "vmfsRawDeviceMap": (frozenset({"VMFSRDM"}), False),
    "vmfsPassthroughRawDeviceMap": (frozenset({"VMFSRDM"}), False),
    "fullDevice": (frozenset({"FLAT"}), False),
    "partitionedDevice": (frozenset({"FLAT", "ZERO"}), False),
}
_ADAPTER_TYPES = frozenset({"ide", "buslogic", "lsilogic", "legacyESX"})
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)
_KV_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a ``SparseExtentHeader``; offsets and sizes are in 512-byte sectors."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: bool
    newline_chars: bytes
    compress_algorithm: int

    @classmethod
    def parse(cls, block: bytes) -> SparseHeader | None:
        """The header in ``block`` (at least 79 bytes), or None when the magic is not KDMV."""
        if len(block) < _HEADER.size or block[:4] != MAGIC:
            return None
        (_, version, flags, capacity, grain, d_off, d_size, gtes, rgd, gd, overhead, unclean,
         newlines, compress) = _HEADER.unpack_from(block)
        return cls(version, flags, capacity, grain, d_off, d_size, gtes, rgd, gd, overhead,
                   bool(unclean), newlines, compress)

    @property
    def stream(self) -> bool:
        """Grains are compressed behind markers (streamOptimized)."""
        return bool(self.flags & FLAG_MARKERS)


@dataclass(frozen=True)
class VmdkExtent:
    """One extent line of a descriptor: ``RW 8388608 SPARSE "disk.vmdk"``."""

    access: str  # RW | RDONLY | NOACCESS
    sectors: int
    type: str  # SPARSE | FLAT | ZERO | VMFS | ...
    file_name: str | None  # None for ZERO extents
    offset: int = 0  # sectors into the file, FLAT extents only


@dataclass
class VmdkInfo:
    """What :func:`inspect_vmdk` found; ``problems`` lists what it could not make sense of."""

    path: Path
    create_type: str | None = None
    capacity: int = 0  # bytes the guest sees
    extents: list[VmdkExtent] = field(default_factory=list)
    adapter_type: str | None = None
    ddb: dict[str, str] = field(default_factory=dict)
    descriptor: dict[str, str] = field(default_factory=dict)  # version, CID, parentCID, ...
    header: SparseHeader | None = None  # when the descriptor is embedded in a sparse extent
    problems: list[str] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        """The descriptor lives inside the sparse extent (monolithicSparse, streamOptimized)."""
        return self.header is not None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _parse_descriptor(text: str, info: VmdkInfo) -> None:
    name = info.path.name
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if match := _EXTENT_RE.match(line):
            access, sectors, kind, file_name, offset = match.groups()
            kind = kind.upper()
            if kind != "ZERO" and file_name is None:
                info.problems.append(f"{name}: descriptor line {number}: the {kind} extent "
                                     "names no file")
            info.extents.append(
                VmdkExtent(access, int(sectors), kind, file_name, int(offset or 0))
            )
        elif match := _KV_RE.match(line):
            key, value = match.group(1), _unquote(match.group(2))
            if key.startswith("ddb."):
                info.ddb[key] = value
            else:
                info.descriptor[key] = value
        else:
            info.problems.append(f"{name}: descriptor line {number} is not understood: {line!r}")
    info.create_type = info.descriptor.get("createType")
    info.adapter_type = info.ddb.get("ddb.adapterType")


def inspect_vmdk(path: str | Path) -> VmdkInfo:
    """Read a VMDK's header and descriptor without QEMU or VMware tools.

    Works for a monolithicSparse/streamOptimized file (header + embedded descriptor) and for
    a descriptor-only ``.vmdk`` naming its extents in other files. Never raises for a bad
    file: what does not make sense goes to ``problems`` (the file name and what is wrong),
    so a lint can report everything at once. Consistency with the data (extent files,
    grain tables) is :func:`lint_vmdk`'s job.
    """
    path = Path(path)
    info = VmdkInfo(path=path)
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            first = f.read(SECTOR)
            header = SparseHeader.parse(first)
            if header is not None:
                info.header = header
                info.problems += _header_problems(name, header)
                if header.descriptor_offset == 0 or header.descriptor_size == 0:
                    info.problems.append(f"{name}: a sparse extent without an embedded "
                                         "descriptor; open its descriptor file instead")
                    info.capacity = header.capacity * SECTOR
                    return info
                if (header.descriptor_offset + header.descriptor_size) * SECTOR > size:
                    info.problems.append(f"{name}: the embedded descriptor lies beyond the "
                                         "end of the file (truncated)")
                    return info
                f.seek(header.descriptor_offset * SECTOR)
                blob = f.read(min(header.descriptor_size * SECTOR, _MAX_DESCRIPTOR))
                text = blob.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif first.startswith(b"COWD"):
                info.problems.append(f"{name}: a VMware 3 / ESX 2 (COWD) disk; convert it "
                                     "to a current VMDK")
                return info
            else:
                if size > _MAX_DESCRIPTOR:
                    info.problems.append(f"{name}: not a VMDK (no KDMV header, and too large "
                                         "for a descriptor file)")
                    return info
                text = (first + f.read()).decode("utf-8", "replace")
                if not text.lstrip("\ufeff \t\r\n").startswith(_DESCRIPTOR_MAGIC):
                    info.problems.append(f"{name}: not a VMDK (neither a KDMV sparse header "
                                         f"nor a text file starting {_DESCRIPTOR_MAGIC!r})")
                    return info
    except OSError as exc:
        info.problems.append(f"{name}: cannot be read: {exc.strerror or exc}")
        return info

    _parse_descriptor(text, info)
    extent_sectors = sum(e.sectors for e in info.extents)
    info.capacity = (header.capacity if header is not None else extent_sectors) * SECTOR
    if not info.extents:
        info.problems.append(f"{name}: the descriptor lists no extents")
    if info.create_type is None:
        info.problems.append(f"{name}: the descriptor has no createType")
    elif info.create_type not in _CREATE_TYPES and info.create_type != "custom":
        info.problems.append(f"{name}: createType {info.create_type!r} is not a VMDK type")
    else:
        allowed, embedded = _CREATE_TYPES.get(info.create_type, (frozenset(), False))
        wrong = sorted({e.type for e in info.extents} - allowed) if allowed else []
        if wrong:
            info.problems.append(f"{name}: createType {info.create_type} does not take "
                                 f"{'/'.join(wrong)} extents")
        if embedded and header is None:
            info.problems.append(f"{name}: createType {info.create_type} needs the descriptor "
                                 "embedded in a sparse extent, but this is a descriptor file")
        if embedded and len(info.extents) != 1:
            info.problems.append(f"{name}: createType {info.create_type} has exactly one "
                                 f"extent, the descriptor lists {len(info.extents)}")
        if info.create_type == "streamOptimized" and header is not None and not header.stream:
            info.problems.append(f"{name}: createType streamOptimized but the header has no "
                                 "compressed-grain markers")
        if info.create_type == "monolithicSparse" and header is not None and header.stream:
            info.problems.append(f"{name}: createType monolithicSparse but the header says "
                                 "streamOptimized (compressed grains with markers)")
    if header is not None and info.extents and header.capacity != extent_sectors:
        info.problems.append(f"{name}: the header capacity ({header.capacity} sectors) differs "
                             f"from the descriptor's extent size ({extent_sectors} sectors)")
    if info.adapter_type is not None and info.adapter_type not in _ADAPTER_TYPES:
        info.problems.append(f"{name}: ddb.adapterType {info.adapter_type!r} is not one of "
                             f"{', '.join(sorted(_ADAPTER_TYPES))}")
    parent = info.descriptor.get("parentCID", "ffffffff").lower()
    if parent != "ffffffff":
        hint = info.descriptor.get("parentFileNameHint", "?")
        info.problems.append(f"{name}: a delta disk (parentCID={parent}, parent {hint!r}); "
                             "ship a standalone disk")
    return info


def _header_problems(name: str, h: SparseHeader) -> list[str]:
    problems: list[str] = []
    if h.version not in (1, 2, 3):
        problems.append(f"{name}: sparse header version {h.version} is not 1, 2 or 3")
    if h.flags & FLAG_NL_TEST and h.newline_chars != b"\n \r\n":
        problems.append(f"{name}: the header's newline test bytes are wrong: the file was "
                        "damaged by a text-mode (ASCII) transfer")
    if h.grain_size < 8 or h.grain_size & (h.grain_size - 1):
        problems.append(f"{name}: grainSize {h.grain_size} sectors is not a power of two >= 8")
    if h.num_gtes_per_gt != 512:
        problems.append(f"{name}: numGTEsPerGT is {h.num_gtes_per_gt}, VMware requires 512")
    if h.compress_algorithm not in (0, 1):
        problems.append(f"{name}: unknown compressAlgorithm {h.compress_algorithm}")
    if h.stream and (not h.flags & FLAG_COMPRESSED or h.compress_algorithm != 1):
        problems.append(f"{name}: the header has grain markers but no deflate compression")
    if h.unclean_shutdown:
        problems.append(f"{name}: uncleanShutdown is set: the program writing it did not "
                        "finish (the disk may be inconsistent)")
    return problems


# --------------------------------------------------------------------------- VMDK linting


def _read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _stream_footer(f: BinaryIO, name: str, size: int) -> tuple[SparseHeader | None, str | None]:
    """The footer header of a streamOptimized file with its GD at the end, or a problem."""
    missing = (f"{name}: a streamOptimized disk must end with a footer and the end-of-stream "
               "marker, and this one does not: the file is truncated or was never finished")
    if size < 3 * SECTOR:
        return None, missing
    tail = _read_at(f, size - 3 * SECTOR, 3 * SECTOR)
    _, m_size, m_type = struct.unpack_from("<QII", tail, 0)
    footer = SparseHeader.parse(tail[SECTOR : 2 * SECTOR])
    eos = tail[2 * SECTOR : 2 * SECTOR + 16] == bytes(16)
    if m_size != 0 or m_type != _MARKER_FOOTER or footer is None or not eos:
        return None, missing
    if footer.gd_offset == GD_AT_END:
        return None, f"{name}: the footer does not say where the grain directory is"
    return footer, None


def _grain_problems(path: Path, header: SparseHeader) -> list[str]:
    """Walk the grain directory and tables and check every grain they reference lies
    inside the file. This is what detects a truncated copy: the tables sit near the start
    and still point at data that is gone."""
    name = path.name
    size = path.stat().st_size
    problems: list[str] = []
    if size % SECTOR:
        problems.append(f"{name}: its size ({size} bytes) is not a whole number of sectors: "
                        "the file is truncated")
    if header.grain_size < 1 or header.num_gtes_per_gt < 1:
        return problems
    with path.open("rb") as f:
        meta = header
        if header.gd_offset == GD_AT_END:
            footer, problem = _stream_footer(f, name, size)
            if footer is None:
                return [*problems, problem or ""]
            meta = footer
        gtes = meta.num_gtes_per_gt
        gt_bytes = gtes * 4
        gd_entries = math.ceil(header.capacity / (header.grain_size * gtes))
        gd_start = meta.gd_offset * SECTOR
        if gd_start == 0 or gd_start + gd_entries * 4 > size:
            return [*problems, f"{name}: the grain directory (sector {meta.gd_offset}) lies "
                    "beyond the end of the file: the file is truncated"]
        directory = struct.unpack(f"<{gd_entries}I", _read_at(f, gd_start, gd_entries * 4))
        lost_tables = 0
        lost_grains = 0
        bad_markers = 0
        inside_metadata = 0
        needed = 0
        for gd_index, gt_sector in enumerate(directory):
            if gt_sector == 0:
                continue
            if gt_sector * SECTOR + gt_bytes > size:
                lost_tables += 1
                continue
            table = struct.unpack(f"<{gtes}I", _read_at(f, gt_sector * SECTOR, gt_bytes))
            for gt_index, grain in enumerate(table):
                if grain == 0 or (grain == 1 and header.flags & FLAG_ZERO_GRAIN):
                    continue
                start = grain * SECTOR
                if not header.stream:
                    if grain < header.overhead:
                        inside_metadata += 1
                    end = start + header.grain_size * SECTOR
                else:
                    marker = _read_at(f, start, 12)
                    if len(marker) < 12:
                        end = start + 12
                    else:
                        lba, compressed = struct.unpack("<QI", marker)
                        end = start + 12 + compressed
                        expected = (gd_index * gtes + gt_index) * header.grain_size
                        if lba != expected or compressed == 0:
                            bad_markers += 1
                if end > size:
                    lost_grains += 1
                    needed = max(needed, end)
    if lost_tables:
        problems.append(f"{name}: {lost_tables} grain table(s) lie beyond the end of the file: "
                        "the file is truncated")
    if lost_grains:
        problems.append(f"{name}: {lost_grains} grain(s) lie beyond the end of the file "
                        f"({size} bytes, the grain tables need at least {needed}): the file "
                        "is truncated")
    if inside_metadata:
        problems.append(f"{name}: {inside_metadata} grain table entr(ies) point into the "
                        "header/metadata area: the grain tables are corrupt")
    if bad_markers:
        problems.append(f"{name}: {bad_markers} grain marker(s) do not match their grain "
                        "table position: the compressed stream is corrupt")
    return problems


def _qemu_img_problems(path: Path, qemu_img: str, timeout: float) -> list[str]:
    exe = shutil.which(qemu_img)
    if exe is None:
        return []  # optional second opinion; the checks above do not need it
    name = path.name
    try:
        proc = subprocess.run(
            [exe, "check", "-f", "vmdk", "--output=json", str(path)],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return [f"{name}: qemu-img check did not finish within {timeout:g}s"]
    if proc.returncode == 63:  # the format cannot be checked: nothing to report
        return []
    report: dict[str, object] = {}
    try:
        parsed = json.loads(proc.stdout) if proc.stdout.strip() else {}
        if isinstance(parsed, dict):
            report = parsed
    except json.JSONDecodeError:
        pass
    problems: list[str] = []
    for key in ("corruptions", "leaks", "check-errors"):
        count = report.get(key)
        if isinstance(count, int) and count:
            problems.append(f"{name}: qemu-img check reports {count} {key.replace('-', ' ')}")
    if proc.returncode != 0:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        detail = "; ".join(errors[:5]) or f"exit status {proc.returncode}"
        problems.append(f"{name}: qemu-img check failed: {detail}")
    return problems


def lint_vmdk(
    path: str | Path, *, qemu_img: str | None = "qemu-img", timeout: float = 120.0
) -> list[str]:
    """Problems with a VMDK (empty = fine to ship).

    Adds to :func:`inspect_vmdk`'s findings: every extent file exists (next to the
    descriptor, without absolute or ``..`` paths), each sparse extent's header matches its
    descriptor line, flat extents are long enough, every grain the grain tables reference
    lies inside its file (a truncated copy fails here), a streamOptimized file whose GD is
    at the end has its footer and end-of-stream marker, and finally ``qemu-img check``
    agrees (skipped when ``qemu_img`` is None or not installed; bounded by ``timeout``).
    """
    path = Path(path)
    info = inspect_vmdk(path)
    problems = list(info.problems)
    if not path.is_file():
        return problems or [f"{path.name}: does not exist"]
    base = path.parent
    for extent in info.extents:
        if extent.file_name is None:
            continue
        label = f"{path.name}: extent {extent.file_name!r}"
        if info.embedded:
            sparse = [(path, info.header)] if info.header is not None else []
        else:
            why = _path_problem(extent.file_name)
            if why is not None:
                problems.append(f"{path.name}: extent file {why}")
                continue
            extent_path = base / extent.file_name
            if not extent_path.is_file():
                problems.append(f"{label} does not exist next to {path.name}")
                continue
            sparse = []
            if extent.type == "SPARSE":
                with extent_path.open("rb") as f:
                    header = SparseHeader.parse(f.read(SECTOR))
                if header is None:
                    problems.append(f"{label} is not a sparse extent (no KDMV header)")
                    continue
                problems += _header_problems(extent_path.name, header)
                if header.capacity != extent.sectors:
                    problems.append(f"{label}: its header capacity ({header.capacity} sectors) "
                                    f"differs from the descriptor ({extent.sectors})")
                sparse = [(extent_path, header)]
            elif extent.type == "FLAT":
                need = (extent.offset + extent.sectors) * SECTOR
                have = extent_path.stat().st_size
                if have < need:
                    problems.append(f"{label} is {have} bytes, shorter than the {need} the "
                                    "descriptor declares: the file is truncated")
        for sparse_path, header in sparse:
            if header is not None:
                problems += _grain_problems(sparse_path, header)
        if info.embedded:
            break  # the one embedded extent is the file itself
    if qemu_img is not None and not problems:
        # Only as a second opinion on a disk that passed: on a broken one it repeats us.
        problems += _qemu_img_problems(path, qemu_img, timeout)
    return problems


# --------------------------------------------------------------------------- .vmx linting

_REQUIRED = (".encoding", "config.version", "virtualhw.version", "guestos", "memsize", "numvcpus")
_DEVICE_PRESENT_RE = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.present$")
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
    path: str | Path, *, qemu_img: str | None = "qemu-img", timeout: float = 120.0
) -> list[str]:
    """Problems with a ``.vmx`` and the disks it names (empty = fine to ship).

    Each problem is a sentence naming the file and the key. Checked: the file parses;
    no key is set twice; the required keys are there; virtualHW.version, memsize and
    numvcpus are in VMware's ranges; there is a disk, its controller is present and of a
    known kind, and its file exists beside the ``.vmx`` under a relative path; the hardware
    version supports the controllers, NICs and firmware; serial port files are relative;
    then every VMDK is linted with :func:`lint_vmdk`.
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
            if prefix == "scsi" and unit == 7:
                problems.append(f"{name}: {dev}: SCSI unit 7 is the controller's own ID")
            if not vmx.get(f"{dev}.filename"):
                problems.append(f"{name}: {dev}.fileName is missing")
    disks = vmx_disks(vmx)
    if not disks:
        problems.append(f"{name}: the VM has no hard disk (no present scsi/sata/nvme/ide disk "
                        "with a fileName)")
    vmdks: list[Path] = []
    for disk in disks:
        key = f"{disk.key}.fileName"
        why = _path_problem(disk.file_name)
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
                why = _path_problem(file_name)
                if why is not None:
                    problems.append(f"{name}: serial{n}.fileName {why}")

    if hw is not None:
        guest_os = vmx.get("guestos", "other")
        kinds = [disk.controller for disk in disks]
        problems += [f"{name}: {p}" for p in compatibility_problems(hw, guest_os, firmware,
                                                                      kinds, nics)]

    for vmdk in vmdks:
        problems += lint_vmdk(vmdk, qemu_img=qemu_img, timeout=timeout)
    return problems
