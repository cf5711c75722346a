"""What the schedulers need to know about a built image: its files, memory, CPUs and size.

Read from the ``.vmx`` (the source of truth the runner boots) and, when present, the
``manifest.json`` that ``vmbuild build`` writes beside it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vmbuild.errors import UsageError
from vmbuild.runner.vmx import VmxError, load_vmx, vmx_info
from vmbuild.stages.artifact import inspect_vmdk

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
    files: list[Path] = field(default_factory=list)  # everything the runner reads: vmx, disks
    disk_files: list[Path] = field(default_factory=list)  # the base disks (never sent back)
    size_bytes: int = 0  # sum of ``files``
    disk_capacity_bytes: int = 0  # what the guest sees, summed over disks (0 if unknown)


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
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
                name = data["name"]
        except (OSError, ValueError):
            pass  # the .vmx alone is enough

    files = [path]
    disks: list[Path] = []
    capacity = 0
    for disk in info.disks:
        disk_path = (path.parent / disk.file_name).resolve()
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
                      disk_capacity_bytes=capacity)
