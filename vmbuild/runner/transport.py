"""The image's transport form: ``NAME.vmdk.zst`` beside the ``.vmx`` instead of ``NAME.vmdk``.

Why: a scheduler copies the image into every job's sandbox, again after every eviction, so
``vmbuild submit`` ships the zstd-compressed disk (a quarter of the monolithicSparse VMDK)
and the runner expands it on the execute node. Both backends then use the expanded VMDK as
they used the image's own disk: QEMU converts it to its qcow2 base, VMware makes its child
(delta) disks over it, which VMware can do only over a monolithicSparse parent.

Where: ``WORKDIR/expanded-KEY/NAME.vmdk``. KEY is the ``.zst``'s content key
(:func:`core.source_key`: its size and first and last MiB; zstd's frame ends with a checksum
of the whole content), so a work directory reused with another image never takes the old
expansion. The file keeps the image disk's name because a monolithicSparse VMDK's embedded
descriptor names its own extent, and VMware opens that name beside the descriptor.

Kill safety: zstd writes into a ``.stage-expand-*`` directory (collected by the next start,
like every ``.stage-`` entry), which is fsync'ed with a small record (``expanded.json``: the
source's key and the size) and then renamed to ``expanded-KEY``. A directory under that name
is therefore complete; a SIGKILL at any instant leaves either nothing usable or a complete
expansion, never a torn disk. zstd verifies the frame's checksum as it decompresses (exit 0
or the expansion is discarded), so no SHA-256 of 300 MiB is computed at every start; a reused
expansion is checked by its record, its size and its VMDK header.

Trust: the expanded VMDK is parsed before anyone opens it: a sparse extent (``KDMV``) with
an embedded descriptor whose only extent is the file itself and which has no parent, so a
crafted ``.zst`` cannot make a hypervisor read a file outside the work directory.

Standard library only, plus the ``zstd`` program (Debian package zstd).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .contract import EXIT_VM_START_FAILED
from .core import RunnerError, fsync_path, source_key

SUFFIX = ".zst"
PREFIX = "expanded-"
RECORD = "expanded.json"
SECTOR = 512
MiB = 1 << 20
_EXTENT_RE = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\S+\s+"([^"]*)"', re.MULTILINE)
_FIELD_RE = re.compile(r'^\s*([A-Za-z.]+)\s*=\s*"?([^"\r\n]*)"?\s*$', re.MULTILINE)


@dataclass(frozen=True)
class Expansion:
    """One image disk expanded from its transport form (what result.json records)."""

    source: str  # the .zst's name in the image directory
    disk: str  # the expanded VMDK, relative to the work directory
    compressed_bytes: int
    expanded_bytes: int
    seconds: float  # how long zstd took (when reused: the original expansion's time)
    reused: bool  # found complete in the work directory, not expanded again

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.reused:
            return (f"using {self.disk} (expanded from {self.source} by an earlier run, "
                    f"{self.expanded_bytes / MiB:.0f} MiB)")
        return (f"expanded {self.source} ({self.compressed_bytes / MiB:.1f} MiB) to "
                f"{self.expanded_bytes / MiB:.0f} MiB in {self.seconds:.1f} s")


def transport_file(image_dir: Path, file_name: str) -> Path | None:
    """The transport form of the image disk ``file_name`` (as the ``.vmx`` names it), when
    the disk itself is absent and ``file_name.zst`` is beside it; else None.

    Refuses (exit 2) a ``.zst`` that is a symbolic link leading out of the image directory:
    the runner reads nothing outside the image's directory and the work directory."""
    if (image_dir / file_name).exists():
        return None
    zst = image_dir / (file_name + SUFFIX)
    if not zst.is_file():
        return None
    root = os.path.realpath(image_dir)
    real = os.path.realpath(zst)
    if not real.startswith(root.rstrip("/") + "/"):
        raise RunnerError(f"{zst}: a symbolic link leading out of the image directory (to "
                          f"{real}); the image's files must lie in its directory", 2)
    return zst


def expansion_dir(zst: Path) -> str:
    """The work directory entry that holds (or will hold) ``zst`` expanded."""
    return PREFIX + source_key(zst)


def kept_names(image_dir: Path, file_names: list[str]) -> list[str]:
    """Work directory entries to keep at a start's garbage collection: the expansions of
    this image's transport disks (those of another image are collected)."""
    names = []
    for file_name in file_names:
        with contextlib.suppress(OSError, RunnerError):
            zst = transport_file(image_dir, file_name)
            if zst is not None:
                names.append(expansion_dir(zst))
    return names


def drop(workdir: Path, image_dir: Path, file_names: list[str]) -> None:
    """Remove this image's expansions from the work directory (the runner leaves it: a
    scheduler moves the work directory back, and the image travels in, never back)."""
    for name in kept_names(image_dir, file_names):
        shutil.rmtree(workdir / name, ignore_errors=True)


def check_vmdk(path: Path) -> int:
    """The capacity in bytes of the standalone sparse VMDK at ``path``; RunnerError when it
    is not one (a parent, another extent file, no embedded descriptor, truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SECTOR)
        if len(head) < 44 or head[:4] != b"KDMV":
            raise RunnerError(f"{path.name}: not a sparse VMDK (no KDMV header)")
        capacity = int.from_bytes(head[12:20], "little")
        offset = int.from_bytes(head[28:36], "little")
        length = int.from_bytes(head[36:44], "little")
        if not capacity or not offset or not length or (offset + length) * SECTOR > size:
            raise RunnerError(f"{path.name}: a sparse VMDK without a readable embedded "
                              "descriptor (or truncated)")
        f.seek(offset * SECTOR)
        text = f.read(min(length * SECTOR, MiB)).split(b"\0", 1)[0].decode("latin-1")
    fields = {m.group(1): m.group(2).strip() for m in _FIELD_RE.finditer(text)}
    if fields.get("parentCID", "ffffffff").lower() != "ffffffff" or \
            "parentFileNameHint" in fields:
        raise RunnerError(f"{path.name}: a delta disk (it names a parent); the transport form "
                          "must hold a standalone disk")
    extents = _EXTENT_RE.findall(text)
    if not extents or any(name != path.name for name in extents):
        raise RunnerError(f"{path.name}: its descriptor names other extent files "
                          f"({', '.join(extents) or 'none'}); the transport form must hold "
                          "a single-file (monolithicSparse) disk")
    return capacity * SECTOR


def _zstd() -> str:
    found = shutil.which("zstd")
    if found is None:
        raise RunnerError("the image's disk is shipped zstd-compressed (its transport form, "
                          ".vmdk.zst) and this host has no zstd program: install the zstd "
                          "package (Debian/Ubuntu/EL: zstd), or ship the plain .vmdk",
                          EXIT_VM_START_FAILED)
    return found


def _reusable(directory: Path, disk: Path, zst: Path, key: str) -> Expansion | None:
    """The complete expansion in ``directory``, if its record matches and it parses."""
    try:
        record = json.loads((directory / RECORD).read_text())
        if record.get("source_key") != key or disk.stat().st_size != record["expanded_bytes"]:
            return None
        check_vmdk(disk)
        return Expansion(zst.name, f"{directory.name}/{disk.name}", zst.stat().st_size,
                         int(record["expanded_bytes"]), float(record.get("seconds", 0.0)),
                         True)
    except (OSError, ValueError, KeyError, TypeError, RunnerError):
        return None


def expand(zst: Path, workdir: Path) -> tuple[Path, Expansion]:
    """``zst`` expanded into the work directory, once: a complete earlier expansion of the
    same content is reused. Returns the VMDK's path and what was done."""
    key = source_key(zst)
    name = zst.name[: -len(SUFFIX)]
    final = workdir / (PREFIX + key)
    disk = final / name
    found = _reusable(final, disk, zst, key)
    if found is not None:
        return disk, found
    zstd = _zstd()
    stage = workdir / f".stage-expand-{os.urandom(4).hex()}"
    try:
        stage.mkdir(parents=True)
        started = time.monotonic()
        # zstd writes holes for runs of zeros (--sparse, its default for files): kept sparse.
        proc = subprocess.run([zstd, "-q", "-d", "--sparse", "-o", str(stage / name), str(zst)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        seconds = round(time.monotonic() - started, 3)
        if proc.returncode != 0:
            raise RunnerError(f"expanding {zst.name} failed (zstd exit {proc.returncode}): "
                              f"{proc.stderr.strip() or 'no message'}", EXIT_VM_START_FAILED)
        try:
            check_vmdk(stage / name)
        except OSError as exc:
            raise RunnerError(f"expanding {zst.name}: {exc}") from exc
        size = (stage / name).stat().st_size
        (stage / RECORD).write_text(json.dumps({
            "source": zst.name, "source_key": key, "compressed_bytes": zst.stat().st_size,
            "expanded_bytes": size, "seconds": seconds}) + "\n")
        for path in (stage / name, stage / RECORD, stage):
            fsync_path(path)
        if final.exists():  # an expansion that did not check out: replaced
            shutil.rmtree(final)
        os.replace(stage, final)
        fsync_path(workdir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return disk, Expansion(zst.name, f"{final.name}/{name}", zst.stat().st_size, size,
                           seconds, False)


def zstd_content_size(path: Path) -> int | None:
    """The decompressed size a zstd file's (first) frame header declares, None if it does
    not say. Read without zstd: the schedulers size a job's scratch disk with it."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return None
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    fcs_flag, single = descriptor >> 6, bool(descriptor & 0x20)
    position = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(head) < position + width:
        return None
    value = int.from_bytes(head[position:position + width], "little")
    return value + 256 if width == 2 else value


def zstd_head(path: Path, length: int = SECTOR) -> bytes:
    """The first ``length`` decompressed bytes of ``path`` (``zstd -dc | head -c``): a
    monolithicSparse VMDK's header, with its capacity, is in the first sector. zstd is
    stopped once they are read, so this costs milliseconds whatever the file's size."""
    proc = subprocess.Popen([_zstd(), "-q", "-d", "-c", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    data = b""
    try:
        while len(data) < length:
            chunk = proc.stdout.read(length - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        proc.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    return data
