"""Builds without root: the hello image built, validated, run and handed to a scheduler by an
ordinary user, and its base disk proven to be the same filesystem as root's.

As root (CI), the test makes an unprivileged user (`vmbuild-test`), copies the source tree to
a directory that user can read (CI's checkout may sit where nobody else can look), and
installs vmbuild there into a venv made as that user from Debian's /usr/bin/python3 — what
the README tells a user to do. The user's commands run with a clean environment (HOME, the
default user PATH without /usr/sbin) and a fresh home directory, so the build starts from an
empty cache as a new user's first build would. Root builds the same recipe's base in the
same run into a fresh cache of its own, so both base stages are cold and can be set side by
side, and both base disks can be compared entry by entry.

Run as an ordinary user, the test builds as that user, with the vmbuild it is running from.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmbuild.stages import disk as diskimage
from vmbuild.stages.base import GUEST_IDS, subordinate_range
from vmbuild.tools import find_tool

from .conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow

TEST_USER = "vmbuild-test"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's default for ordinary users: no sbin
_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache",
                                 ".pytest_cache", "*.egg-info", "build", "dist", "out")


@dataclass
class Rootless:
    """What the module's builds left behind, for the tests below to read."""

    user: str
    home: Path
    python: str
    work: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float
    install_seconds: float | None = None
    root_proc: subprocess.CompletedProcess[str] | None = None
    root_seconds: float | None = None
    root_cache: Path | None = None
    notes: list[str] = field(default_factory=list)

    def as_user(self, *argv: str | Path, timeout: float = 1800,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return as_user(self.user, self.home, argv, timeout=timeout, cwd=cwd or self.work)

    @property
    def out(self) -> Path:
        return self.work / "out" / "hello"

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.out / "manifest.json").read_text())
        return data


def as_user(user: str, home: Path, argv: tuple[str | Path, ...] | list[str | Path],
            timeout: float = 1800, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user` with a clean environment; as that user already when not root."""
    env = ["env", "-i", f"HOME={home}", f"PATH={USER_PATH}", "LANG=C.UTF-8", f"USER={user}",
           f"LOGNAME={user}"]
    prefix = [find_tool("runuser") or "runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *env, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)


def _ensure_user() -> str:
    """The unprivileged build user, made (with subordinate ids) when missing."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run([find_tool("useradd") or "useradd", "--create-home", "--shell",
                        "/bin/bash", TEST_USER], check=True)
    uid = pwd.getpwnam(TEST_USER).pw_uid
    for path, flag in ((Path("/etc/subuid"), "--add-subuids"),
                       (Path("/etc/subgid"), "--add-subgids")):
        if subordinate_range(path, TEST_USER, uid) is None:
            subprocess.run([find_tool("usermod") or "usermod", flag, "300000-365535", TEST_USER],
                           check=True)
    return TEST_USER


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    missing = [t for t in ("packer", "qemu-system-x86_64", "mmdebstrap", "newuidmap")
               if shutil.which(t) is None]
    if missing:  # a set-up problem, not a reason to skip: scripts/setup.sh installs them
        raise AssertionError("missing " + ", ".join(missing) + ": run scripts/setup.sh")
    # /var/tmp: on disk (images are hundreds of MiB) and traversable by every user.
    work = Path(tempfile.mkdtemp(prefix="vmbuild-rootless-", dir="/var/tmp"))
    try:
        yield _build_both(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_both(work: Path) -> Rootless:
    work.chmod(0o755)
    home = work / "home"
    home.mkdir()
    if os.geteuid() == 0:
        user = _ensure_user()
        src = work / "src"
        shutil.copytree(REPO, src, ignore=_IGNORE, symlinks=True)
        subprocess.run(["chown", "-R", f"{user}:{user}", str(work)], check=True)
        t = time.monotonic()
        venv = work / "venv"
        _check(as_user(user, home, ["/usr/bin/python3", "-m", "venv", venv], cwd=work),
               "python3 -m venv (as the user)")
        _check(as_user(user, home, [venv / "bin/pip", "install", "-q", src], cwd=work,
                       timeout=900), "pip install (as the user)")
        install_seconds: float | None = time.monotonic() - t
        python = str(venv / "bin/python")
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
        python, install_seconds = sys.executable, None
    recipe = EXAMPLES / "hello" / "recipe.yaml" if os.geteuid() != 0 \
        else work / "src/examples/hello/recipe.yaml"

    t = time.monotonic()
    proc = as_user(user, home, [python, "-m", "vmbuild.cli", recipe, "-o", work / "out/hello"],
                   cwd=work)
    result = Rootless(user, home, python, work, proc, time.monotonic() - t, install_seconds)
    if os.geteuid() == 0:
        # The same recipe's base built by root in the same run, from an empty cache of its
        # own (the base stage only: the rest of the build does not depend on who runs it,
        # and the suite builds hello as root elsewhere).
        result.root_cache = work / "root-cache"
        t = time.monotonic()
        result.root_proc = subprocess.run(
            [sys.executable, "-c", ROOT_BASE, recipe, result.root_cache],
            capture_output=True, text=True, timeout=1800, check=False)
        result.root_seconds = time.monotonic() - t
    return result


#: Builds a recipe's base into a given cache and prints its key.
ROOT_BASE = """\
import sys
from pathlib import Path
from vmbuild.recipe import load_recipe
from vmbuild.stages.base import ensure_base
base = ensure_base(load_recipe(sys.argv[1]), lambda event: None, cache=Path(sys.argv[2]))
print(base.key)
"""


def test_hello_builds_and_validates_as_an_ordinary_user(rootless: Rootless) -> None:
    _check(rootless.proc, f"vmbuild build as {rootless.user}")
    out = rootless.out
    assert rootless.proc.stdout.strip().startswith(f"image: {out / 'hello.vmx'}")
    assert "job exited 0 and the VM powered off" in rootless.proc.stderr
    assert (out / "hello.vmdk").stat().st_uid == pwd.getpwnam(rootless.user).pw_uid
    # A new user's first build: the base was built here, into that user's own cache.
    manifest = rootless.manifest
    assert manifest["base_cached"] is False
    base = rootless.home / ".cache/vmbuild/base" / str(manifest["base_key"])
    assert (base / "base.qcow2").is_file()
    assert json.loads((base / "base.json").read_text())["built_by"] == "unshare"
    # Nothing of the base's work tree (subordinate-uid files) is left in the cache.
    assert sorted(p.name for p in base.parent.iterdir()) == \
        sorted([base.name, f"{base.name}.lock"])


def test_the_user_runs_the_image_and_writes_submit_files(rootless: Rootless) -> None:
    _check(rootless.proc, "the build")
    vmx = rootless.out / "hello.vmx"
    run = rootless.as_user(rootless.python, "-m", "vmbuild.cli", "run", vmx, "--backend", "qemu",
                           "--workdir", rootless.work / "job1",
                           "--output-dir", rootless.work / "results", timeout=900)
    _check(run, "vmbuild run as the user")
    assert "hello from the guest" in run.stdout
    assert (rootless.work / "results/result.txt").is_file()
    sub = rootless.as_user(rootless.python, "-m", "vmbuild.cli", "submit", vmx,
                           "--scheduler", "condor", "-o", rootless.work / "submit")
    _check(sub, "vmbuild submit as the user")
    assert (rootless.work / "submit/hello.sub").is_file()
    assert (rootless.work / "submit/vmbuild-run.pyz").is_file()


# ---- reading a base disk back -------------------------------------------------------------

def _raw(qcow2: Path, dest: Path) -> str:
    """The base's root filesystem as debugfs names it (a raw copy at the partition offset)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(dest)], check=True)
    layout = diskimage.plan_layout(dest.stat().st_size, "bios")
    return f"{dest}?offset={layout.root_offset}"


def _debugfs(fs: str, commands: list[str]) -> str:
    proc = subprocess.run([find_tool("debugfs") or "debugfs", "-f", "-", fs],
                          input="\n".join(commands) + "\n", capture_output=True, text=True,
                          check=True)
    return proc.stdout


def walk(fs: str) -> dict[str, tuple[int, int, int]]:
    """Every path in the filesystem -> (mode with type bits, uid, gid), one debugfs per level."""
    tree: dict[str, tuple[int, int, int]] = {}
    level = ["/"]
    while level:
        out = _debugfs(fs, [f'ls -p "{d}"' for d in level])
        level, current = [], ""
        for line in out.splitlines():
            if line.startswith("debugfs: ls -p "):
                current = line[len('debugfs: ls -p "'):-1].rstrip("/")
                continue
            fields = line.split("/")  # /inode/mode/uid/gid/name/size/
            if len(fields) >= 7 and fields[5] not in (".", ".."):
                path = f"{current}/{fields[5]}"
                mode = int(fields[2], 8)
                tree[path] = (mode, int(fields[3]), int(fields[4]))
                if mode & 0o170000 == 0o040000:
                    level.append(path)
    return tree


def xattrs(fs: str, paths: list[str]) -> dict[str, str]:
    """Path -> its extended attributes as debugfs prints them, for the paths that have any."""
    out = _debugfs(fs, [f'ea_list "{p}"' for p in paths])
    found: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith('debugfs: ea_list "'):
            current = line[len('debugfs: ea_list "'):-1]
        elif line.strip() and not line.startswith("Extended attributes:"):
            found.setdefault(current, []).append(line.strip())
    return {p: "\n".join(v) for p, v in found.items()}


def device(fs: str, path: str) -> str:
    """A device node's "major:minor" (debugfs prints it in hex too: dropped)."""
    out = _debugfs(fs, [f'stat "{path}"'])
    return next((line.split(":", 1)[1].split()[0] for line in out.splitlines()
                 if line.startswith("Device major/minor number")), "")


def base_seconds(proc: subprocess.CompletedProcess[str]) -> str:
    """How long the build's base stage took, from its progress line ("?" if not found)."""
    found = re.search(r"base: building base image \S+ \(mmdebstrap\): done in (\d+s)",
                      proc.stderr)
    return found.group(1) if found else "?"


# What a Debian base must hold whoever built it: (mode with type bits, uid, gid).
EXPECTED = {
    "/": (0o040755, 0, 0),
    "/etc/shadow": (0o100640, 0, 42),  # root:shadow
    "/usr/bin/passwd": (0o104755, 0, 0),  # setuid root
    "/usr/bin/chage": (0o102755, 0, 42),  # setgid shadow
    "/var/log/journal": (0o042755, 0, 999),  # setgid systemd-journal (a system group)
    "/dev/null": (0o020666, 0, 0),
    "/dev/ptmx": (0o020666, 0, 0),
    "/dev/fd": (0o120777, 0, 0),
    "/dev/pts": (0o040755, 0, 0),
    "/tmp": (0o041777, 0, 0),
    "/etc/fstab": (0o100644, 0, 0),
    "/usr/local/lib/vmbuild/vmbuild-build-access": (0o100755, 0, 0),
    "/boot/grub/grub.cfg": (0o100644, 0, 0),
}


def test_rootless_base_is_the_same_filesystem_as_roots(rootless: Rootless, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _check(rootless.proc, "the build")
    key = str(rootless.manifest["base_key"])
    user_fs = _raw(rootless.home / ".cache/vmbuild/base" / key / "base.qcow2",
                   tmp_path / "user.raw")
    user_tree = walk(user_fs)
    fsck = subprocess.run([find_tool("e2fsck") or "e2fsck", "-fn", user_fs],
                          capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for path, want in EXPECTED.items():
        got = user_tree.get(path) if path != "/" else want
        assert got == want, f"{path}: {got and oct(got[0])} {got} != {oct(want[0])} {want}"
    # Guest ids, not the host's subordinate ones (100000 + n), throughout.
    assert max(max(uid, gid) for _, uid, gid in user_tree.values()) < GUEST_IDS
    assert device(user_fs, "/dev/null") == "01:03"
    assert device(user_fs, "/dev/console") == "05:01"

    if rootless.root_proc is None:
        pytest.skip("not root: no root build in this run to compare the whole tree with")
    _check(rootless.root_proc, "root's base build")
    assert rootless.root_proc.stdout.strip() == key  # the same base, as far as its settings go
    assert rootless.root_cache is not None
    root_fs = _raw(rootless.root_cache / "base" / key / "base.qcow2", tmp_path / "root.raw")
    root_tree = walk(root_fs)
    assert len(root_tree) > 5000
    differ = {p: (oct(root_tree[p][0]), root_tree[p][1:], oct(user_tree[p][0]),
                  user_tree[p][1:])
              for p in root_tree.keys() & user_tree.keys() if root_tree[p] != user_tree[p]}
    assert differ == {}
    assert sorted(root_tree.keys() ^ user_tree.keys()) == []
    files = sorted(p for p, (mode, _, _) in root_tree.items()
                   if mode & 0o170000 in (0o100000, 0o040000))
    root_xattrs = xattrs(root_fs, files)
    assert xattrs(user_fs, files) == root_xattrs
    devices = sorted(p for p, (mode, _, _) in root_tree.items() if mode & 0o170000 == 0o020000)
    assert [device(user_fs, p) for p in devices] == [device(root_fs, p) for p in devices]

    with capsys.disabled():
        install = f"{rootless.install_seconds:.0f}" if rootless.install_seconds else "-"
        print(f"\nhello build as {rootless.user} (rootless, cold cache) "
              f"{rootless.seconds:.0f}s; its base stage {base_seconds(rootless.proc)}, root's "
              f"base stage in the same run {rootless.root_seconds:.0f}s; user's venv + pip "
              f"install {install}s; {len(root_tree)} paths compared, "
              f"{len(root_xattrs)} with xattrs, {len(devices)} device nodes")
