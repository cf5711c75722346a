"""Read and write VMware ``.vmx`` files, and a small typed view of the parts the runner needs.

Standard library only: this module ships inside the runner zipapp, where both backends read
the image's ``.vmx`` (the VMware backend to run it, the QEMU backend to rebuild the same
machine from it), so the ``.vmx`` stays the single description of the VM.

The format, as VMware writes and reads it:

* one ``key = "value"`` per line; ``#`` starts a comment line; blank lines are ignored;
* keys are case-insensitive (``displayName`` and ``displayname`` are the same key), so
  :func:`parse_vmx` lower-cases them; the last occurrence of a key wins;
* values are double-quoted; characters that cannot appear literally (the quote itself,
  ``|``, control characters) are written as ``|XX``, the hex value of one byte of the
  file's encoding (``|22`` is ``"``, ``|7C`` is ``|``, ``|0A`` a newline);
* ``.encoding`` names the file's character set; VMware writes ``"UTF-8"``.
"""

from __future__ import annotations

import codecs
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "SCSI_KINDS",
    "UNIT_RANGES",
    "VMDK_ADAPTER_TYPES",
    "VmxDisk",
    "VmxError",
    "VmxInfo",
    "VmxLine",
    "VmxNic",
    "VmxSerial",
    "controller_kind",
    "controller_prefix",
    "controller_present",
    "dump_vmx",
    "free_units",
    "iter_vmx_lines",
    "load_vmx",
    "parse_vmx",
    "read_vmx_text",
    "vmx_bool",
    "vmx_disks",
    "vmx_escape",
    "vmx_info",
    "vmx_unescape",
]


class VmxError(ValueError):
    """A ``.vmx`` that VMware itself would refuse to load (or that lacks what we need).

    ``line`` is the 1-based line number when the problem is tied to one line.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class VmxLine(NamedTuple):
    """One ``key = value`` line as found in the file: kept for linting (duplicates, lines)."""

    line: int  # 1-based
    key: str  # as written (original case)
    value: str  # unescaped


# A key is what VMware accepts left of "=": letters, digits and a little punctuation
# (".encoding", "scsi0:0.fileName", "guestinfo.my-key", "ethernet0.pciSlotNumber").
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]/@]+$")
_ESCAPE_RE = re.compile(r"(?:\|[0-9A-Fa-f]{2})+")
_ENCODING_RE = re.compile(rb'^[ \t]*\.encoding[ \t]*=[ \t]*"([^"\r\n]*)"', re.MULTILINE | re.I)


def vmx_unescape(value: str, encoding: str = "utf-8") -> str:
    """Undo VMware's ``|XX`` escaping.

    Consecutive ``|XX`` are one byte string in the file's encoding (a non-ASCII character
    that VMware chose to escape spans several), so runs are decoded together; a run that
    is not valid in ``encoding`` falls back to Latin-1 rather than failing, because a
    garbled display name must not stop a VM from being read. A ``|`` not followed by two
    hex digits is kept literally, as VMware does.
    """

    def decode(match: re.Match[str]) -> str:
        raw = bytes(int(match.group(0)[i + 1 : i + 3], 16) for i in range(0, len(match[0]), 3))
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    return _ESCAPE_RE.sub(decode, value)


def _needs_escape(ch: str) -> bool:
    return ch in '"|' or not ch.isprintable()


def vmx_escape(value: str) -> str:
    """Escape a value for a UTF-8 ``.vmx``: ``"``, ``|``, control and non-printable characters
    become ``|XX`` per UTF-8 byte; everything printable (including non-ASCII) stays literal,
    which is what VMware itself writes."""
    if not any(_needs_escape(ch) for ch in value):
        return value
    out: list[str] = []
    for ch in value:
        if _needs_escape(ch):
            out.extend(f"|{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


def iter_vmx_lines(text: str, encoding: str = "utf-8") -> Iterator[VmxLine]:
    """Yield every ``key = value`` line of ``text`` in file order, values unescaped.

    Raises :class:`VmxError` for a line VMware could not read (no ``=``, an empty or
    malformed key, an unterminated quote, junk after the closing quote), because VMware
    refuses such a file rather than guessing, and so must a lint.
    """
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if number == 1:
            line = line.lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep:
            raise VmxError(f"expected 'key = \"value\"', found {raw.strip()!r}", number)
        if not key or not _KEY_RE.match(key):
            raise VmxError(f"{key!r} is not a valid key", number)
        rest = rest.strip()
        if rest.startswith('"'):
            end = rest.find('"', 1)
            if end < 0:
                raise VmxError(f"{key}: the value has no closing quote", number)
            value = rest[1:end]
            tail = rest[end + 1 :].strip()
            if tail and not tail.startswith("#"):
                raise VmxError(f"{key}: unexpected text after the value: {tail!r}", number)
        else:
            # VMware also accepts unquoted values (old hand-written files); a '#' ends them.
            value = rest.split("#", 1)[0].strip()
        yield VmxLine(number, key, vmx_unescape(value, encoding))


def parse_vmx(text: str, encoding: str = "utf-8") -> dict[str, str]:
    """Parse ``.vmx`` text into an ordered ``{lower-case key: value}`` dict.

    ``encoding`` is the charset the ``|XX`` escapes are decoded in (the file's
    ``.encoding``; :func:`load_vmx` passes it). A repeated key keeps its first position
    and its last value, matching VMware's "last one wins".
    """
    result: dict[str, str] = {}
    for entry in iter_vmx_lines(text, encoding):
        result[entry.key.lower()] = entry.value
    return result


def _detect_encoding(data: bytes) -> str:
    match = _ENCODING_RE.search(data)
    if match:
        name = match.group(1).decode("ascii", "replace").strip()
        try:
            return codecs.lookup(name).name
        except LookupError as exc:
            raise VmxError(f".encoding: unknown character set {name!r}") from exc
    return "utf-8"


def read_vmx_text(path: str | Path) -> tuple[str, str]:
    """Read a ``.vmx`` file and return ``(text, encoding)``.

    The encoding is taken from the file's ``.encoding`` line. A file without one is read as
    UTF-8, falling back to Latin-1 (files written by old VMware versions on Windows carry
    the host code page and no ``.encoding``); Latin-1 never fails, so such a file is still
    readable. A file that declares an encoding and violates it is an error.
    """
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    declared = _ENCODING_RE.search(data) is not None
    encoding = _detect_encoding(data)
    try:
        return data.decode(encoding), encoding
    except UnicodeDecodeError as exc:
        if declared:
            raise VmxError(f"not valid {encoding} as its .encoding says: {exc}") from exc
        return data.decode("latin-1"), "latin-1"


def load_vmx(path: str | Path) -> dict[str, str]:
    """Read and parse a ``.vmx`` file (see :func:`parse_vmx`)."""
    text, encoding = read_vmx_text(path)
    return parse_vmx(text, encoding)


def dump_vmx(mapping: Mapping[str, str | int | bool]) -> str:
    """Render a mapping as ``.vmx`` text: ``.encoding = "UTF-8"`` first, then one
    ``key = "value"`` line per entry in mapping order, values escaped with :func:`vmx_escape`.

    Keys keep the case given (VMware does not care; people reading the file do). Integers
    are written in decimal and booleans as ``TRUE``/``FALSE``, VMware's spelling. Any
    ``.encoding`` entry in the mapping is dropped, since the text is always UTF-8.
    Raises ValueError for keys VMware could not read back or for the same key twice in
    different case, which would silently collapse into one when read.
    """
    lines = ['.encoding = "UTF-8"']
    seen: set[str] = set()
    for key, value in mapping.items():
        if not _KEY_RE.match(key):
            raise ValueError(f"{key!r} is not a valid .vmx key")
        lower = key.lower()
        if lower == ".encoding":
            continue
        if lower in seen:
            raise ValueError(f"the .vmx key {key!r} appears twice (keys are case-insensitive)")
        seen.add(lower)
        if isinstance(value, bool):
            text = "TRUE" if value else "FALSE"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = value
        lines.append(f'{key} = "{vmx_escape(text)}"')
    return "\n".join(lines) + "\n"


def vmx_bool(value: str | None, default: bool = False) -> bool:
    """VMware's boolean reading: TRUE/FALSE in any case (also yes/no, 1/0); else ``default``."""
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    return default


class VmxDisk(NamedTuple):
    """A hard disk the VM has: on which controller kind, bus (controller number), unit."""

    controller: str  # pvscsi | lsilogic | lsisas1068 | buslogic | sata | nvme | ide
    bus: int
    unit: int
    file_name: str  # as written in the .vmx, normally relative to the .vmx directory

    @property
    def key(self) -> str:
        """The VMware device key prefix, e.g. ``scsi0:0``."""
        return f"{controller_prefix(self.controller)}{self.bus}:{self.unit}"


class VmxNic(NamedTuple):
    """A network adapter: ``ethernetN.virtualDev`` and ``ethernetN.connectionType``."""

    number: int  # N of ethernetN
    virtual_dev: str  # vmxnet3 | e1000e | e1000 | vlance | ...
    connection_type: str  # nat | bridged | hostonly | custom | ...


class VmxSerial(NamedTuple):
    """A serial port (``serialN``); index 0 is COM1 / ttyS0."""

    number: int  # N of serialN: 0 is COM1
    file_name: str
    file_type: str = "file"  # file | pipe | device | network | thinprint


SCSI_KINDS = frozenset({"pvscsi", "lsilogic", "lsisas1068", "buslogic"})

#: Device units each controller prefix offers, and the ones a disk may not take: SCSI IDs
#: 0-15 with 7 the controller's own; SATA (AHCI) ports 0-29; NVMe namespaces 0-14; IDE
#: master/slave. A unit outside these is a device VMware refuses to power on.
UNIT_RANGES: dict[str, tuple[range, frozenset[int]]] = {
    "scsi": (range(16), frozenset({7})),
    "sata": (range(30), frozenset()),
    "nvme": (range(15), frozenset()),
    "ide": (range(2), frozenset()),
}

#: ``ddb.adapterType`` for a VMDK attached to each controller kind. A VMDK descriptor knows
#: only ``ide``, ``buslogic`` and ``lsilogic`` (``legacyESX`` for old ESX): VMware's own
#: ``vmware-vdiskmanager -a`` help lists "ide, buslogic, lsilogic. Pass lsilogic for other
#: adapter types", and the vSphere API's VirtualDiskAdapterType enum has only ide, busLogic
#: and lsiLogic. So PVSCSI, LSI SAS, SATA and NVMe disks are all ``lsilogic`` (kiwi issue
#: #1847 reports VMware support saying the same for PVSCSI); only IDE disks say ``ide``.
VMDK_ADAPTER_TYPES: dict[str, str] = {
    "pvscsi": "lsilogic",
    "lsilogic": "lsilogic",
    "lsisas1068": "lsilogic",
    "buslogic": "buslogic",
    "sata": "lsilogic",
    "nvme": "lsilogic",
    "ide": "ide",
}


def controller_prefix(kind: str) -> str:
    """The device-key prefix for a controller kind: every SCSI kind is ``scsiN`` (told apart
    by ``scsiN.virtualDev``), the others are named by their kind (``sataN``, ``nvmeN``)."""
    return kind if kind in ("sata", "nvme", "ide") else "scsi"


def free_units(mapping: Mapping[str, str], prefix: str, bus: int) -> Iterator[int]:
    """The units of controller ``prefix``+``bus`` a new disk may take, lowest first: those
    in the controller's range, not reserved, and not held by a present device (a CD-ROM
    counts too) in the parsed ``mapping``."""
    units, reserved = UNIT_RANGES[prefix]
    taken: set[int] = set()
    for key, value in mapping.items():
        match = _DEVICE_PRESENT_RE.match(key)
        if match and match.group(1) == prefix and int(match.group(2)) == bus and vmx_bool(value):
            taken.add(int(match.group(3)))
    return (unit for unit in units if unit not in reserved and unit not in taken)


@dataclass(frozen=True)
class VmxInfo:
    """What a backend needs to know about the VM, read from its ``.vmx``."""

    memory_mib: int
    cpus: int
    firmware: str  # bios | efi
    guest_os: str
    hardware_version: int
    disks: list[VmxDisk] = field(default_factory=list)
    nics: list[VmxNic] = field(default_factory=list)
    serial_ports: list[VmxSerial] = field(default_factory=list)
    display_name: str = ""


_DEVICE_RE = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.filename$")
_DEVICE_PRESENT_RE = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.present$")
_NIC_RE = re.compile(r"^ethernet(\d+)\.present$")
_SERIAL_RE = re.compile(r"^serial(\d+)\.present$")


def _int(mapping: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = mapping.get(key)
    if value is None or not value.strip():
        if default is None:
            raise VmxError(f"{key} is missing")
        return default
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise VmxError(f"{key} = {value!r} is not a whole number") from None


def controller_present(mapping: Mapping[str, str], prefix: str, bus: int) -> bool:
    """Whether controller ``prefix``+``bus`` exists; IDE controllers are built into the
    chipset and need no ``.present`` key."""
    if prefix == "ide":
        return vmx_bool(mapping.get(f"ide{bus}.present"), default=True)
    return vmx_bool(mapping.get(f"{prefix}{bus}.present"))


def controller_kind(mapping: Mapping[str, str], prefix: str, bus: int) -> str:
    """The controller kind for a device prefix: SCSI controllers are told apart by
    ``virtualDev``; VMware's default for modern Linux guests, LSI Logic, when it is absent."""
    if prefix == "scsi":
        return mapping.get(f"scsi{bus}.virtualdev", "lsilogic").strip().lower() or "lsilogic"
    return prefix


def vmx_disks(mapping: Mapping[str, str]) -> list[VmxDisk]:
    """The present hard disks (CD-ROM devices excluded), ordered by controller (in the order
    controllers first appear in the file), then bus, then unit: the first is the boot disk."""
    order: dict[str, int] = {}
    found: list[tuple[int, int, int, VmxDisk]] = []
    for key, value in mapping.items():
        match = _DEVICE_RE.match(key)
        if not match:
            continue
        prefix, bus, unit = match.group(1), int(match.group(2)), int(match.group(3))
        dev = f"{prefix}{bus}:{unit}"
        if not vmx_bool(mapping.get(f"{dev}.present")):
            continue
        if not controller_present(mapping, prefix, bus):
            continue
        device_type = mapping.get(f"{dev}.devicetype", "").lower()
        if "cdrom" in device_type or "floppy" in device_type:
            continue
        rank = order.setdefault(prefix, len(order))
        disk = VmxDisk(controller_kind(mapping, prefix, bus), bus, unit, value)
        found.append((rank, bus, unit, disk))
    return [disk for *_, disk in sorted(found, key=lambda item: item[:3])]


def vmx_info(mapping: Mapping[str, str]) -> VmxInfo:
    """Build the typed view of a parsed ``.vmx`` (keys lower-case, as :func:`parse_vmx`).

    Raises :class:`VmxError` when ``memsize`` or ``virtualHW.version`` is missing or not a
    number: a VM cannot be reproduced without them. ``numvcpus`` defaults to 1 and
    ``guestOS`` to ``other``, as in VMware. NIC ``virtualDev`` defaults to ``e1000`` (what
    VMware picks for current 64-bit Linux guests) and ``connectionType`` to ``bridged``.
    """
    nics: list[VmxNic] = []
    serials: list[VmxSerial] = []
    for key, value in mapping.items():
        if (match := _NIC_RE.match(key)) and vmx_bool(value):
            index = int(match.group(1))
            dev = mapping.get(f"ethernet{index}.virtualdev", "").strip().lower() or "e1000"
            conn = mapping.get(f"ethernet{index}.connectiontype", "").strip().lower()
            nics.append(VmxNic(index, dev, conn or "bridged"))
        elif (match := _SERIAL_RE.match(key)) and vmx_bool(value):
            index = int(match.group(1))
            file_type = mapping.get(f"serial{index}.filetype", "").strip().lower() or "device"
            serials.append(VmxSerial(index, mapping.get(f"serial{index}.filename", ""), file_type))
    nics.sort()
    serials.sort()
    firmware = mapping.get("firmware", "bios").strip().lower()
    return VmxInfo(
        memory_mib=_int(mapping, "memsize"),
        cpus=_int(mapping, "numvcpus", 1),
        firmware="efi" if firmware == "efi" else "bios",
        guest_os=mapping.get("guestos", "other"),
        hardware_version=_int(mapping, "virtualhw.version"),
        disks=vmx_disks(mapping),
        nics=nics,
        serial_ports=serials,
        display_name=mapping.get("displayname", ""),
    )


# --------------------------------------------------------------------------- containment

#: Bytes of a VMDK descriptor read to find the files it names (descriptors are small).
_DESCRIPTOR_MAX = 1 << 20
_EXTENT_RE = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\S+\s+"([^"]*)"', re.MULTILINE)
_PARENT_RE = re.compile(r'^\s*parentFileNameHint\s*=\s*"([^"]*)"', re.MULTILINE)


def _escapes(directory: Path, name: str) -> str | None:
    """Why ``name`` (as a .vmx or .vmdk writes it, relative to ``directory``) is not a file
    inside ``directory``: absolute, climbing out with '..', or a symbolic link leading out."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"{name!r} is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return f"{name!r} climbs out of the image directory ('..')"
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(directory, name))
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        return f"{name!r} is a symbolic link leading out of the image directory (to {real})"
    return None


def _vmdk_descriptor(path: Path) -> str:
    """The descriptor text of a VMDK: the file itself when it is a text descriptor, the
    embedded one of a monolithic sparse extent, else empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            if head[:4] == b"KDMV" and len(head) >= 44:
                offset, size = struct.unpack_from("<QQ", head, 28)
                if offset and size:
                    f.seek(offset * 512)
                    return f.read(min(size * 512, _DESCRIPTOR_MAX)).decode("latin-1")
                return ""
            if head.lstrip().startswith(b"#") or b"createType" in head:
                return (head + f.read(_DESCRIPTOR_MAX)).decode("latin-1")
    except OSError:
        pass
    return ""


def outside_files(vmx_path: str | Path, mapping: Mapping[str, str]) -> list[str]:
    """Files the ``.vmx`` at ``vmx_path`` makes a hypervisor read or write that lie outside
    its directory: its disks (and the extents and parents their VMDK descriptors name), its
    file-backed serial ports and its NVRAM. Each problem is a sentence naming the key.

    Why: the runner converts and boots whatever the image names, on an execute node, under
    the scheduler's account, and the work directory travels back to whoever submitted the
    job; a .vmx naming ``/etc/shadow`` as a disk would hand that file to the guest (and to the
    submitter). An image is self-contained, so anything outside its directory is refused."""
    vmx_path = Path(vmx_path)
    directory = vmx_path.parent
    name = vmx_path.name
    problems: list[str] = []
    named: list[tuple[str, str]] = []
    for disk in vmx_disks(mapping):
        named.append((f"{disk.key}.fileName", disk.file_name))
    for key, value in mapping.items():
        if (match := _SERIAL_RE.match(key)) and vmx_bool(value):
            index = match.group(1)
            if mapping.get(f"serial{index}.filetype", "").strip().lower() == "file":
                named.append((f"serial{index}.fileName",
                              mapping.get(f"serial{index}.filename", "")))
    if mapping.get("nvram"):
        named.append(("nvram", mapping["nvram"]))
    for key, file_name in named:
        if not file_name:
            continue
        why = _escapes(directory, file_name)
        if why is not None:
            problems.append(f"{name}: {key} {why}; the image's files must lie in its "
                            "directory")
            continue
        if key.endswith(".fileName") and not key.startswith("serial"):
            disk_path = directory / file_name
            text = _vmdk_descriptor(disk_path)
            refs = [("extent", m) for m in _EXTENT_RE.findall(text)]
            refs += [("parentFileNameHint", m) for m in _PARENT_RE.findall(text)]
            for what, ref in refs:
                why = _escapes(disk_path.parent, ref)
                if why is not None:
                    problems.append(f"{name}: {key} {file_name!r}: its {what} {why}; the "
                                    "image's files must lie in its directory")
    return problems
