"""What the schedulers need to know about a built image: its files, memory, CPUs and size.

Read from the ``.vmx`` (the source of truth the runner boots) and, when present, the
``manifest.json`` that ``vmbuild build`` writes beside it.

A disk with a transport form beside it (``NAME.vmdk.zst``, written by the build) is shipped
in that form, not as ``NAME.vmdk``: a job start then moves a quarter of the bytes, and the
runner expands it in the sandbox (:mod:`vmbuild.runner.transport`). Its capacity comes from
the plain VMDK when it is there, else from the VMDK header at the start of the zstd stream
(``zstd -dc | head -c 512``), else from the manifest.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vmbuild.errors import UsageError
from vmbuild.runner import transport
from vmbuild.runner.core import RunnerError
from vmbuild.runner.vmx import VmxError, load_vmx, vmx_info
from vmbuild.vmdk import SparseHeader, inspect_vmdk

_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


class SchedulerError(UsageError):
    """The image or the options cannot make a scheduler file."""



@dataclass(frozen=True)
class ImageFacts:
    """A built image as a scheduler sees it."""

    vmx: Path  # absolute
    name: str  # safe for file and job names
    memory_mib: int
    cpus: int
    files: list[Path] = field(default_factory=list)  # what a job gets: vmx, disks as shipped
    disk_files: list[Path] = field(default_factory=list)  # the disks as shipped (never sent back)
    size_bytes: int = 0  # sum of ``files``
    disk_capacity_bytes: int = 0  # what the guest sees, summed over disks (0 if unknown)
    expanded_bytes: int = 0  # the shipped transport forms once the runner expanded them

    @property
    def transported(self) -> list[Path]:
        """The disks shipped in their transport form (``.vmdk.zst``)."""
        return [p for p in self.disk_files if p.name.endswith(transport.SUFFIX)]

    @property
    def working_disk_bytes(self) -> int:
        """The disks as the runner works from them: plain ones, and the expanded ones."""
        plain = sum(p.stat().st_size for p in self.disk_files
                    if not p.name.endswith(transport.SUFFIX))
        return plain + self.expanded_bytes


def safe_name(text: str) -> str:
    """A name usable in file names, job names and ClassAd strings."""
    cleaned = _NAME_RE.sub("-", text).strip("-.")
    return cleaned or "vmbuild-job"


def image_facts(vmx: str | Path) -> ImageFacts:
    """Read the image at ``vmx``; raises :class:`SchedulerError` when it cannot be used."""
    path = Path(vmx).expanduser().resolve()
    if path.suffix.lower() != ".vmx":
        raise SchedulerError(f"{vmx}: expected the image's .vmx file")
    try:
        info = vmx_info(load_vmx(path))
    except FileNotFoundError:
        raise SchedulerError(f"{vmx}: no such file") from None
    except (OSError, VmxError) as exc:
        raise SchedulerError(f"{vmx}: {exc}") from None

    name = path.stem
    manifest: dict[str, object] = {}
    if (path.parent / "manifest.json").is_file():
        try:
            data = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
            manifest = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            pass  # the .vmx alone is enough
    if isinstance(manifest.get("name"), str) and manifest["name"]:
        name = str(manifest["name"])

    files = [path]
    disks: list[Path] = []
    capacity = expanded = 0
    for disk in info.disks:
        zst = (path.parent / (disk.file_name + transport.SUFFIX)).resolve()
        disk_path = (path.parent / disk.file_name).resolve()
        if zst.is_file():
            disks.append(zst)
            size, disk_capacity = _transport_sizes(zst, disk_path, manifest, len(info.disks))
            expanded += size
            capacity += disk_capacity
            continue
        if not disk_path.is_file():
            raise SchedulerError(f"{vmx}: disk {disk.file_name!r} ({disk.key}) is missing")
        disks.append(disk_path)
        vmdk = inspect_vmdk(disk_path)
        capacity += vmdk.capacity
        for extent in vmdk.extents:  # descriptor-only VMDKs keep their data elsewhere
            if extent.file_name and not vmdk.embedded:
                extent_path = (disk_path.parent / extent.file_name).resolve()
                if extent_path.is_file() and extent_path not in disks:
                    disks.append(extent_path)
    if not disks:
        raise SchedulerError(f"{vmx}: the VM has no hard disk")
    files += disks
    nvram = load_vmx(path).get("nvram")
    if nvram and (path.parent / nvram).is_file():
        files.append((path.parent / nvram).resolve())
    size = sum(f.stat().st_size for f in files)
    return ImageFacts(vmx=path, name=safe_name(name), memory_mib=info.memory_mib,
                      cpus=max(1, info.cpus), files=files, disk_files=disks, size_bytes=size,
                      disk_capacity_bytes=capacity, expanded_bytes=expanded)


def _transport_sizes(zst: Path, vmdk: Path, manifest: dict[str, object],
                     disks: int) -> tuple[int, int]:
    """(expanded size, capacity) of the disk shipped as ``zst``; 0 where nothing says.

    The expanded size is the zstd frame's declared content size (the build's zstd writes
    it), else the plain VMDK's size, else four times the compressed size (at most the
    capacity). The capacity is read from the plain VMDK when it is there, else from the
    sparse header that starts the compressed stream, else (a single disk) from the
    manifest's ``sizes.virtual``."""
    size = transport.zstd_content_size(zst) or 0
    if vmdk.is_file():
        return size or vmdk.stat().st_size, inspect_vmdk(vmdk).capacity
    capacity = 0
    header = None
    with contextlib.suppress(OSError, RunnerError):  # no zstd here: the manifest may say
        header = SparseHeader.parse(transport.zstd_head(zst))
    sizes = manifest.get("sizes")
    if header is not None:
        capacity = header.capacity * 512
    elif disks == 1 and isinstance(sizes, dict) and isinstance(sizes.get("virtual"), int):
        capacity = int(sizes["virtual"])
    if not size:
        size = 4 * zst.stat().st_size
        size = min(size, capacity) if capacity else size
    return size, capacity
