"""Run an external build tool; a failure becomes a BuildError that names the step.

Every build step shells out to some tool (sfdisk, mkfs, grub-mkimage, qemu-img, chroot ...);
one wrapper keeps their failures reported alike: the step, the tool, its exit status and the
last lines it printed.

Several of those tools live in /usr/sbin or /sbin, which Debian leaves off an ordinary user's
PATH although the tools work unprivileged on a file (sfdisk, mkfs.ext4, debugfs, mkfs.fat).
A rootless build must still find them, so lookups fall back to those directories, and
child processes get them appended to PATH (dpkg inside the guest's root tree refuses to
run maintainer scripts without /usr/sbin on PATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from vmbuild.errors import BuildError

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """The path of `name` on PATH, else in the sbin directories; None when absent."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def missing_tools(names: tuple[str, ...] | list[str]) -> list[str]:
    """Those of `names` that `find_tool` cannot find, in the given order."""
    return [name for name in names if find_tool(name) is None]


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a build tool: the caller's, with the sbin directories on PATH."""
    env = dict(os.environ if base is None else base)
    parts = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join([*parts, *(d for d in SBIN_DIRS if d not in parts)])
    return env


def run_tool(argv: list[str], what: str, stdin: str | None = None) -> str:
    """Run `argv` (never through a shell); return its stdout, or raise BuildError."""
    exe = find_tool(argv[0]) or argv[0]
    try:
        proc = subprocess.run([exe, *argv[1:]], input=stdin, capture_output=True, text=True,
                              check=False, env=tool_env())
    except FileNotFoundError as exc:
        raise BuildError(f"{what} failed: {argv[0]} is not installed") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BuildError(f"{what} failed ({argv[0]} exit {proc.returncode}): " + " / ".join(detail))
    return proc.stdout
