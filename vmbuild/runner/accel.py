"""Find a QEMU accelerator that really works, within a bounded time.

On some hosts /dev/kvm exists and opens, yet KVM guests hang at their first instruction (nested
virtualisation without the right CPU flags). So the probe boots a real, tiny guest: one boot
sector that writes to QEMU's isa-debug-exit port. KVM counts as working only when that guest
exits with the expected code before the deadline and QEMU could give it the CPU model it asked
for; otherwise the answer is TCG.
Standard library only: the runner ships alone to execute nodes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PROBE_TIMEOUT = 10.0
_EXIT_VALUE = 0x2A
_EXPECTED_STATUS = (_EXIT_VALUE << 1) | 1  # isa-debug-exit reports (value << 1) | 1

# mov al, 0x2a ; out 0xf4, al ; hlt ; jmp $-1   — then the 0x55AA boot signature.
_BOOT_SECTOR = bytes([0xB0, _EXIT_VALUE, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") \
    + b"\x55\xaa"


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def kvm_works(timeout: float = PROBE_TIMEOUT) -> bool:
    """True only when a KVM guest boots and exits on its own before `timeout` seconds."""
    binary = qemu_binary()
    if binary is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="vmbuild-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_BOOT_SECTOR)
        argv = [binary, "-machine", "pc,accel=kvm", "-nodefaults", "-display", "none",
                "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive", f"file={disk},format=raw,if=ide", "-no-reboot"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        # A KVM that cannot give the guest the CPU model QEMU asked for runs this boot
        # sector but hangs a real kernel (seen on nested hosts without SSE3 passed through).
        unsupported = b"host doesn't support requested feature" in proc.stderr
        return proc.returncode == _EXPECTED_STATUS and not unsupported


@functools.cache
def best_accelerator() -> str:
    """`kvm` when it really runs guests here, else `tcg`; VMBUILD_ACCEL overrides the probe.

    The verdict is cached on disk per host kernel and QEMU binary, so a resumed job does not
    pay for the probe again; a new kernel or QEMU probes afresh.
    """
    forced = os.environ.get("VMBUILD_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    key = _probe_key()
    cache = _cache_file()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            return str(cached["accel"])
    except (OSError, ValueError, AttributeError):
        pass
    accel = "kvm" if kvm_works() else "tcg"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "accel": accel}))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs the probe next time
    return accel


def cache_root() -> Path:
    """Where vmbuild keeps what it can remake (base images, this probe's verdict):
    $VMBUILD_CACHE, else $XDG_CACHE_HOME/vmbuild, else ~/.cache/vmbuild."""
    env = os.environ.get("VMBUILD_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmbuild"


def _cache_file() -> Path:
    return cache_root() / "accel.json"


def _probe_key() -> str:
    binary = qemu_binary() or ""
    try:
        stamp = os.stat(binary).st_mtime_ns if binary else 0
    except OSError:
        stamp = 0
    return f"{os.uname().release}|{binary}|{stamp}|{os.access('/dev/kvm', os.W_OK)}"
