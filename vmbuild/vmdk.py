"""Read and lint ``.vmdk`` files without QEMU: sparse headers, descriptors, grain tables.

A VMDK truncated by an interrupted copy, or whose descriptor disagrees with its data, fails
on a grid site with nobody there to read the error; this module finds that on the build host.

The structures follow VMware's "Virtual Disk Format 5.0" specification: a sparse
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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

__all__ = [
    "SparseHeader",
    "VmdkExtent",
    "VmdkInfo",
    "inspect_vmdk",
    "lint_vmdk",
    "path_problem",
]

MiB = 1024**2
SECTOR = 512

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


def path_problem(name: str) -> str | None:
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
            why = path_problem(extent.file_name)
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
