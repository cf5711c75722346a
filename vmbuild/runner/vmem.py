"""VMware's saved memory in a checkpoint: ``X.vmem`` compressed to ``X.vmem.zst``, and back.

Why: a VMware suspend writes the guest's whole memory (``.vmem``, the size of ``memsize``)
beside the ``.vmss``, and a scheduler moves the work directory (HTCondor: to the schedd's
spool and into the next sandbox) at every eviction. Most of a guest's memory is zero pages
and page cache, so ``zstd -1`` (fast enough to stay within the suspend's time on one core)
makes it a fraction of that. The runner compresses only when it leaves a suspended VM
behind (a periodic checkpoint that resumes at once would pay both ways for nothing).

Kill safety. The suspended VM directory is consistent at every instant, so a runner killed
at any point resumes from it (or starts fresh when VMware never finished the suspend):

* compressing: zstd writes ``X.vmem.zst.partial``, which is fsync'ed and renamed to
  ``X.vmem.zst``; only then is ``X.vmem`` removed. A ``.partial`` file is never read;
* expanding (before ``vmrun start`` resumes the VM): zstd writes ``X.vmem.partial``,
  renamed to ``X.vmem`` once complete; only then is ``X.vmem.zst`` removed;
* so an ``X.vmem`` is always complete (VMware's own, or renamed into place), and wins over
  an ``X.vmem.zst`` beside it.

Standard library only, plus the ``zstd`` program.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .core import RunnerError, fsync_path

SUFFIX = ".zst"
PARTIAL = ".partial"
MiB = 1 << 20


@dataclass(frozen=True)
class Converted:
    """One memory file compressed (or expanded): sizes and how long zstd took."""

    name: str  # the .vmem's name
    raw_bytes: int
    packed_bytes: int
    seconds: float

    def describe(self, expanded: bool = False) -> str:
        raw, packed = f"{self.raw_bytes / MiB:.0f} MiB", f"{self.packed_bytes / MiB:.1f} MiB"
        if expanded:
            return (f"expanded {self.name}{SUFFIX} ({packed}) to {self.name} ({raw}) in "
                    f"{self.seconds:.1f}s")
        return f"{self.name} {raw} -> {self.name}{SUFFIX} {packed} in {self.seconds:.1f}s"


def _run(argv: list[str], what: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RunnerError(f"{what} failed (zstd exit {proc.returncode}): "
                          f"{proc.stderr.strip() or 'no message'}")
    return time.monotonic() - started


def _zstd_into(target: Path, zstd: list[str], source: Path, what: str) -> float:
    """Run zstd from ``source`` into ``target`` through ``target.partial``, fsync'ed and
    renamed: ``target`` exists only complete, and a failure leaves nothing half-written."""
    partial = target.with_name(target.name + PARTIAL)
    try:
        seconds = _run([*zstd, "-q", "-f", "-o", str(partial), str(source)], what)
        fsync_path(partial)
        os.replace(partial, target)
    except BaseException:
        _remove(partial)
        raise
    return seconds


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def clean_partials(vm_dir: Path) -> None:
    """Remove what a killed compression or expansion left half-written."""
    for leftover in vm_dir.glob(f"*{PARTIAL}"):
        _remove(leftover)


def pack(vm_dir: Path, zstd: str) -> list[Converted]:
    """Compress every ``.vmem`` in ``vm_dir`` (the VM is suspended and VMware has released
    its files). On an error the ``.vmem`` is kept as it is: the checkpoint stays valid,
    uncompressed, and RunnerError says why."""
    clean_partials(vm_dir)
    done: list[Converted] = []
    for vmem in sorted(vm_dir.glob("*.vmem")):
        packed = vmem.with_name(vmem.name + SUFFIX)
        seconds = _zstd_into(packed, [zstd, "-1", "-T0"], vmem, f"compressing {vmem.name}")
        fsync_path(vm_dir)
        raw = vmem.stat().st_size
        vmem.unlink()
        fsync_path(vm_dir)
        done.append(Converted(vmem.name, raw, packed.stat().st_size, seconds))
    return done


def unpack(vm_dir: Path) -> list[str]:
    """Before a resume: every ``X.vmem.zst`` back to the ``X.vmem`` VMware reads; returns
    the log lines. RunnerError (exit 90, the checkpoint kept) when it cannot be done."""
    clean_partials(vm_dir)
    lines: list[str] = []
    for packed in sorted(vm_dir.glob(f"*.vmem{SUFFIX}")):
        vmem = packed.with_name(packed.name[: -len(SUFFIX)])
        if vmem.exists():  # complete by construction: the compressed copy is redundant
            _remove(packed)
            continue
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RunnerError(f"the checkpoint's memory ({packed.name}) is zstd-compressed and "
                              f"this host has no zstd program (install the zstd package); "
                              f"the checkpoint stays in {vm_dir.parent}")
        seconds = _zstd_into(vmem, [zstd, "-d", "--sparse"], packed,
                             f"expanding {packed.name} (the checkpoint stays in {vm_dir.parent})")
        fsync_path(vm_dir)
        converted = Converted(vmem.name, vmem.stat().st_size, packed.stat().st_size, seconds)
        packed.unlink()
        fsync_path(vm_dir)
        lines.append(converted.describe(expanded=True))
    return lines
