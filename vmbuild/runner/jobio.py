"""The job's input and output disks, made and read on the host without root.

Inputs: the files and directories given with ``--input`` (plus ``vmbuild-input.json`` with
extra arguments and environment) are written into an ext4 filesystem labelled ``VMBINPUT``
with ``mkfs.ext4 -d`` (no mount, no root). Outputs: an empty ext4 filesystem labelled
``VMBOUTPUT``; after the VM powers off its tree is walked with read-only debugfs requests
and rebuilt under ``--output-dir`` by this module, treating everything on it as hostile.
Both are converted to qcow2 so the runner can layer and checkpoint them like the system disk.

Standard library only: the runner ships alone to execute nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import selectors
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import EXIT_OUTPUTS_LOST, INPUT_LABEL, OUTPUT_LABEL
from .core import RunnerError

INPUT_SPEC = "vmbuild-input.json"
_MIB = 1024 * 1024


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise RunnerError(f"{name} is needed on this host (package e2fsprogs/qemu-utils)")
    return found


def _run(argv: list[str], timeout: float | None = None) -> None:
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunnerError(f"{' '.join(argv[:2])} took over {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise RunnerError(f"{' '.join(argv[:2])} failed: {proc.stdout.strip()[-800:]}")


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, dirs, files in os.walk(path):
        total += 4096 * (len(dirs) + 1)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size + 4096
    return total


def make_ext4(target: Path, label: str, source: Path | None, size_bytes: int) -> None:
    """An ext4 image of ``size_bytes`` (sparse) at ``target``, filled from ``source``."""
    size_bytes = max(size_bytes, 8 * _MIB)
    size_bytes = (size_bytes + _MIB - 1) // _MIB * _MIB
    with open(target, "wb") as f:
        f.truncate(size_bytes)
    argv = [_tool("mkfs.ext4"), "-q", "-F", "-L", label, "-m", "0",
            "-E", "root_owner=0:0", "-O", "^has_journal"]
    if source is not None:
        argv += ["-d", str(source)]
    _run([*argv, str(target)])


def to_qcow2(raw: Path, target: Path) -> None:
    _run([_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(target)])


def make_input_disk(target: Path, inputs: Sequence[Path], args: Sequence[str],
                    env: dict[str, str], *, command: Sequence[str] | None = None,
                    shell: bool = False) -> None:
    """A qcow2 at ``target`` holding an ext4 labelled VMBINPUT with the inputs at its top
    (each under its own base name) and ``vmbuild-input.json`` when args/env are given.

    ``command`` replaces the image's job command and ``shell`` asks for a root shell on the
    console instead of the job: both exist for one boot only (a validation boot, ``vmbuild
    shell``), which is why they travel here and are never baked into the image."""
    with tempfile.TemporaryDirectory(prefix=".stage-input-", dir=target.parent) as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        for item in inputs:
            if not item.exists():
                raise RunnerError(f"--input {item}: no such file or directory", 2)
            dest = stage / item.resolve().name
            if dest.exists() or dest.name == INPUT_SPEC:
                raise RunnerError(f"--input {item}: two inputs named {dest.name!r}", 2)
            if item.is_dir():
                shutil.copytree(item, dest, symlinks=True)
            else:
                shutil.copy2(item, dest)
        if args or env or command or shell:
            spec: dict[str, object] = {"args": list(args), "environment": dict(env)}
            if command:
                spec["command"] = list(command)
            if shell:
                spec["shell"] = True
            (stage / INPUT_SPEC).write_text(json.dumps(spec, indent=1) + "\n")
        size = _tree_size(stage) * 5 // 4 + 16 * _MIB
        raw = Path(tmp) / "input.raw"
        make_ext4(raw, INPUT_LABEL, stage, size)
        to_qcow2(raw, target)


def make_output_disk(target: Path, size_mib: int) -> None:
    """A qcow2 at ``target`` holding an empty ext4 labelled VMBOUTPUT of ``size_mib``."""
    with tempfile.TemporaryDirectory(prefix=".stage-output-", dir=target.parent) as tmp:
        raw = Path(tmp) / "output.raw"
        make_ext4(raw, OUTPUT_LABEL, None, size_mib * _MIB)
        to_qcow2(raw, target)


# --------------------------------------------------------------------------- outputs
#
# The guest runs as root and owns the output disk byte for byte: everything read back from it
# is hostile input. So debugfs is used only to *read* (``ls -p``, ``stat``, ``cat`` of an
# inode number, never a guest-supplied name), and every byte that lands on the host is
# written by this module, under names it checked, with modes it chose, below ``dest`` only
# (each directory opened with O_NOFOLLOW, each file created with O_EXCL). ``rdump`` is not
# used: it follows the guest's tree and writes whatever it says (devices, setuid files,
# links anywhere), as the user running it.

#: How deep and how wide a tree may be: a crafted directory graph ends here, not in a hang.
MAX_DEPTH = 64
MAX_ENTRIES = 100_000
#: Seconds one debugfs listing or stat may take, and bytes it may print (a crafted directory
#: whose extents repeat one block would otherwise list forever).
DEBUGFS_TIMEOUT = 120.0
LIST_LIMIT = 64 * _MIB
#: A file's dump may take DEBUGFS_TIMEOUT plus its size at this rate (bytes per second).
DUMP_RATE = 4 * _MIB
_BLOCK = 64 * 1024
_ZERO = bytes(_BLOCK)
_BANNER = re.compile(r"^debugfs \d+\.\d+")
# One line of ``ls -p``: /inode/mode/uid/gid/name/size/ (size empty for directories). The
# name is printed raw, so one holding "/" (only a crafted filesystem has that) makes the
# listing ambiguous: such a listing is refused as a whole, never guessed at.
_ENTRY = re.compile(rb"/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/\n")
_ROOT_INO = 2


class _Aborted(Exception):
    """A debugfs call was stopped: it ran too long or printed too much."""


@dataclass
class Extraction:
    """What came back from the output disk, and what did not.

    ``dropped``: entries deliberately not returned (links leading out, devices, FIFOs,
    sockets, bad names, directory loops) or returned changed (setuid bits cleared) — listed,
    but the outputs are complete. ``problems``: why the outputs are *incomplete* (a corrupt
    filesystem, the size limit, a host error); any problem ends the run with exit 93."""

    files: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    limit: int = 0

    @property
    def complete(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"files": len(self.files), "links": len(self.links), "limit": self.limit,
                "complete": self.complete, "problems": self.problems,
                "dropped": self.dropped}


def _debugfs(debugfs: str, raw: Path, request: str, *, timeout: float, limit: int,
             sink: Callable[[bytes], None] | None = None) -> tuple[bytes, str]:
    """Run one read-only debugfs request on ``raw``: (stdout, its error lines).

    Bounded in time and output, because the filesystem is the guest's: a crafted one must
    not hang the runner or fill its memory. ``sink`` receives stdout as it comes instead (a
    file's contents); it may raise to stop early. debugfs exits 0 even when it cannot open
    the filesystem, so its errors are read from stderr (everything but its version banner).
    """
    proc = subprocess.Popen([debugfs, "-R", request, str(raw)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Aborted(f"debugfs {request.split()[0]} took over {timeout:.0f}s")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, _BLOCK)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data is out and sink is not None:
                        sink(chunk)
                    else:
                        key.data.extend(chunk)
                        if len(key.data) > limit:
                            raise _Aborted(f"debugfs {request.split()[0]} printed over "
                                           f"{limit} bytes")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    errors = [line for line in err.decode("utf-8", "backslashreplace").splitlines()
              if line.strip() and not _BANNER.match(line)]
    return bytes(out), "; ".join(errors)


def _parse_listing(out: bytes) -> list[tuple[int, int, bytes, int]] | None:
    """The entries of one ``ls -p``: (inode, mode, name, size); None when ambiguous."""
    entries = []
    pos = 0
    while pos < len(out):
        if out[pos:pos + 1] == b"\n":
            pos += 1
            continue
        match = _ENTRY.match(out, pos)
        if match is None:
            return None
        ino, mode, _uid, _gid, name, size = match.groups()
        pos = match.end()
        if int(ino) == 0:
            continue  # an unused slot (lost+found is made of them), not an entry
        entries.append((int(ino), int(mode, 8), name, int(size or b"0")))
    return entries


def name_problem(name: bytes) -> str | None:
    """Why an entry name from the guest must not become a host file name, or None."""
    if not name:
        return "empty name"
    if name in (b".", b".."):
        return f"an extra entry named {name.decode()!r} (a crafted filesystem)"
    if b"/" in name or b"\0" in name:
        return "'/' or NUL in the name (a crafted filesystem)"
    if any(byte < 0x20 or byte == 0x7F for byte in name):
        return "a control character in the name"
    return None


def _shown(path: str) -> str:
    """A guest path fit for a terminal and result.json: control characters and bytes that
    are not UTF-8 written as \\xNN (a name could otherwise move the cursor on stderr)."""
    return "".join(c if c.isprintable() else
                   "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in path)


def _link_problem(rel_dir: str, target: bytes) -> str | None:
    """Why a symbolic link must not be recreated: it must stay inside the output directory
    (judged on the text here; links through other links are checked once all exist)."""
    if not target:
        return "an empty link target"
    if b"\0" in target or any(byte < 0x20 or byte == 0x7F for byte in target):
        return "a control character in the link target"
    text = os.fsdecode(target)
    if text.startswith("/"):
        return f"an absolute link ({text!r}) leads outside the output directory"
    resolved = posixpath.normpath(posixpath.join(rel_dir, text))
    if resolved == ".." or resolved.startswith("../"):
        return f"the link ({text!r}) leads outside the output directory"
    return None


class _SparseWriter:
    """Write a stream into ``fd``, leaving all-zero blocks as holes: a sparse file in the
    guest stays sparse on the host. Refuses to write more than ``limit`` bytes."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.written = 0
        self.pending = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.limit:
            raise _Aborted(f"the file grew past its recorded size ({self.limit} bytes)")
        self.pending += chunk
        while len(self.pending) >= _BLOCK:
            self._put(bytes(self.pending[:_BLOCK]))
            del self.pending[:_BLOCK]

    def _put(self, block: bytes) -> None:
        if block == _ZERO[:len(block)]:
            os.lseek(self.fd, len(block), os.SEEK_CUR)
            return
        view = memoryview(block)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        if self.pending:
            self._put(bytes(self.pending))
            self.pending.clear()
        os.ftruncate(self.fd, self.written)


def _open_dir(root_fd: int, parts: Sequence[str]) -> int:
    """A descriptor of ``parts`` below ``root_fd``, never through a symbolic link."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Extractor:
    """One walk of the output filesystem into ``dest`` (see :func:`extract_outputs`)."""

    def __init__(self, debugfs: str, raw: Path, dest: Path, limit: int) -> None:
        self.debugfs = debugfs
        self.raw = raw
        self.dest = dest
        self.left = limit
        self.result = Extraction(limit=limit)
        self.entries = 0
        self.dir_modes: list[tuple[list[str], int]] = []
        self.link_parts: list[list[str]] = []
        self.serial = 0

    def drop(self, rel: str, reason: str) -> None:
        self.result.dropped.append({"path": _shown(rel), "reason": reason})

    def problem(self, message: str) -> None:
        self.result.problems.append(message)

    def read(self, request: str, limit: int = LIST_LIMIT) -> tuple[bytes, str]:
        return _debugfs(self.debugfs, self.raw, request, timeout=DEBUGFS_TIMEOUT, limit=limit)

    def listing(self, ino: int, rel: str) -> list[tuple[int, int, bytes, int]] | None:
        try:
            out, errors = self.read(f"ls -p <{ino}>")
        except _Aborted as exc:
            self.problem(f"{rel or '/'}: the directory could not be listed: {exc}")
            return None
        if errors:
            if ino == _ROOT_INO:
                raise RunnerError(f"the output disk holds no readable filesystem: {errors}",
                                  EXIT_OUTPUTS_LOST)
            self.problem(f"{rel}: the directory could not be read: {errors}")
            return None
        entries = _parse_listing(out)
        if entries is None:
            self.problem(f"{rel or '/'}: the directory has a name debugfs cannot list "
                         "unambiguously (a '/' in a name: a crafted filesystem)")
        return entries

    def walk(self, root_fd: int) -> None:
        stack: list[tuple[int, list[str], int]] = [(_ROOT_INO, [], 0)]
        visited = {_ROOT_INO}
        while stack:
            ino, parts, depth = stack.pop()
            rel = "/".join(parts)
            entries = self.listing(ino, rel)
            if entries is None:
                continue
            try:
                dir_fd = _open_dir(root_fd, parts)
            except OSError as exc:
                self.problem(f"{rel}: cannot open the directory on the host: {exc}")
                continue
            try:
                for sub_ino, mode, name, size in self.entries_of(entries, rel, depth):
                    path = f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name)
                    if self.entries >= MAX_ENTRIES:
                        self.problem(f"more than {MAX_ENTRIES} entries: the rest is not "
                                     "extracted")
                        return
                    self.entries += 1
                    try:
                        if stat.S_ISDIR(mode):
                            if depth + 1 > MAX_DEPTH:
                                self.drop(path, f"deeper than {MAX_DEPTH} directories")
                                self.problem(f"{path}: deeper than {MAX_DEPTH} directories")
                            elif sub_ino in visited:
                                self.drop(path, "a directory reached twice (a loop or a "
                                          "hard-linked directory: a crafted filesystem)")
                            else:
                                visited.add(sub_ino)
                                if self.make_dir(dir_fd, name, path, mode):
                                    stack.append((sub_ino, [*parts, os.fsdecode(name)],
                                                  depth + 1))
                        elif stat.S_ISREG(mode):
                            self.file(dir_fd, sub_ino, name, path, mode, size)
                        elif stat.S_ISLNK(mode):
                            self.link(dir_fd, sub_ino, name, path, rel, size, parts)
                        else:
                            self.drop(path, _KINDS.get(stat.S_IFMT(mode),
                                                       f"an unknown file type ({mode:o})"))
                    except OSError as exc:
                        self.drop(path, f"the host refused it: {exc.strerror or exc}")
                        self.problem(f"{path}: could not be written on the host: {exc}")
            finally:
                os.close(dir_fd)

    def entries_of(self, entries: list[tuple[int, int, bytes, int]], rel: str,
                   depth: int) -> Iterable[tuple[int, int, bytes, int]]:
        """The entries worth extracting: the real "." and ".." (the first of each) are
        skipped, names are checked, an empty lost+found at the top is not returned."""
        seen: set[bytes] = set()
        for ino, mode, name, size in entries:
            if name in (b".", b"..") and name not in seen:
                seen.add(name)
                continue
            path = f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name)
            why = name_problem(name)
            if why is not None:
                self.drop(path, why)
                continue
            if depth == 0 and name == b"lost+found" and stat.S_ISDIR(mode):
                inside = self.listing(ino, path)
                if inside is not None and all(n in (b".", b"..") for _, _, n, _ in inside):
                    continue
            yield ino, mode, name, size

    def make_dir(self, dir_fd: int, name: bytes, path: str, mode: int) -> bool:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                self.drop(path, "the output directory already has a non-directory there")
                return False
        self.dir_modes.append((path.split("/"), (mode & 0o777) | 0o700))
        return True

    def _temp_name(self) -> str:
        self.serial += 1
        return f".vmbuild-part-{os.getpid()}-{self.serial}"

    def _place(self, dir_fd: int, temp: str, name: bytes, path: str) -> None:
        """Rename ``temp`` over ``name`` (a rerun replaces its previous outputs; a directory
        in the way is not replaced)."""
        try:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            os.unlink(temp, dir_fd=dir_fd)
            raise

    def file(self, dir_fd: int, ino: int, name: bytes, path: str, mode: int,
             size: int) -> None:
        if size > self.left:
            self.drop(path, f"its {size} bytes exceed what is left of the output limit "
                      f"({self.left} of {self.result.limit} bytes)")
            self.problem(f"{path}: {size} bytes exceed the output limit "
                         f"({self.result.limit} bytes, the output disk's size)")
            return
        temp = self._temp_name()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        writer = _SparseWriter(fd, size)
        failure = ""
        try:
            _out, errors = _debugfs(self.debugfs, self.raw, f"cat <{ino}>",
                                    timeout=DEBUGFS_TIMEOUT + size / DUMP_RATE,
                                    limit=LIST_LIMIT, sink=writer)
            writer.close()
            if errors:
                failure = errors
            elif writer.written != size:
                failure = f"{writer.written} of its {size} bytes could be read"
            os.fchmod(fd, (mode & 0o777) | 0o600)  # never setuid/setgid/sticky
        except _Aborted as exc:
            failure = str(exc)
        finally:
            os.close(fd)
        if failure:
            os.unlink(temp, dir_fd=dir_fd)
            self.drop(path, f"unreadable: {failure}")
            self.problem(f"{path}: could not be read from the output disk: {failure}")
            return
        self._place(dir_fd, temp, name, path)
        self.left -= size
        self.result.files.append(path)
        if mode & 0o7000:
            self.drop(path, "setuid/setgid/sticky bits cleared (the file itself was kept)")

    def link_target(self, ino: int, size: int) -> bytes | None:
        """A symbolic link's target: in the inode (a fast link, as ``stat`` prints it) or in
        a data block (read with ``cat``); None when it cannot be read as recorded."""
        if not 0 < size <= 4096:
            return None
        try:
            out, errors = self.read(f"stat <{ino}>", limit=1 << 20)
            marker = b'Fast link dest: "'
            start = out.find(marker)
            if start >= 0:
                target = out[start + len(marker):].rstrip(b"\n")
                if not target.endswith(b'"'):
                    return None
                target = target[:-1]
            else:
                target, errors = self.read(f"cat <{ino}>", limit=8192)
        except _Aborted:
            return None
        return target if not errors and len(target) == size else None

    def link(self, dir_fd: int, ino: int, name: bytes, path: str, rel_dir: str, size: int,
             parts: list[str]) -> None:
        target = self.link_target(ino, size)
        if target is None:
            self.drop(path, "a symbolic link whose target cannot be read")
            return
        why = _link_problem(rel_dir, target)
        if why is not None:
            self.drop(path, why)
            return
        temp = self._temp_name()
        os.symlink(target, temp, dir_fd=dir_fd)
        self._place(dir_fd, temp, name, path)
        self.link_parts.append([*parts, os.fsdecode(name)])
        self.result.links.append(path)

    def check_links(self) -> None:
        """Drop every kept link that, followed through the others, resolves outside the
        output directory (e.g. ``a/up -> ..`` then ``a/out -> up/..``); repeat until none
        does, since dropping one changes where others lead."""
        root = os.path.realpath(self.dest)
        changed = True
        while changed:
            changed = False
            for parts in list(self.link_parts):
                real = os.path.realpath(os.path.join(self.dest, *parts))
                if real == root or real.startswith(root.rstrip("/") + "/"):
                    continue
                os.unlink(os.path.join(self.dest, *parts))
                path = "/".join(parts)
                self.link_parts.remove(parts)
                self.result.links.remove(path)
                self.drop(path, "the link leads outside the output directory (through "
                          "other links)")
                changed = True

    def set_dir_modes(self, root_fd: int) -> None:
        """The guests' directory modes, minus special bits, applied last (deepest first): a
        read-only directory would have refused its own contents."""
        for parts, mode in sorted(self.dir_modes, key=lambda item: -len(item[0])):
            with contextlib.suppress(OSError):
                fd = _open_dir(root_fd, parts)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)


_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def extract_outputs(top_layer: Path, dest: Path, limit: int | None = None) -> Extraction:
    """Copy the files of the output disk (its qcow2 chain ending in ``top_layer``, whose
    headers name their backing files relatively) into ``dest``, safely (see above).

    ``limit``: bytes the returned files may add up to (default: the disk's size, all a
    well-behaved guest could have written; a sparse file counts at its full length, which is
    what copying it on costs). Raises RunnerError (exit 93) when the disk holds no readable
    filesystem; partial failures are in the result's ``problems``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stage-extract-", dir=top_layer.parent) as tmp:
        raw = Path(tmp) / "output.raw"
        try:
            _run([_tool("qemu-img"), "convert", "-q", "-O", "raw", str(top_layer), str(raw)],
                 timeout=DEBUGFS_TIMEOUT * 5)
        except RunnerError as exc:
            raise RunnerError(str(exc), EXIT_OUTPUTS_LOST) from exc
        size = raw.stat().st_size
        work = _Extractor(_tool("debugfs"), raw, dest, size if limit is None else limit)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                work.walk(root_fd)
            except _Aborted as exc:
                work.problem(str(exc))
            work.check_links()
            work.set_dir_modes(root_fd)
        finally:
            os.close(root_fd)
        work.result.files.sort()
        work.result.links.sort()
        return work.result
