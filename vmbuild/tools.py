"""Run an external build tool; a failure becomes a BuildError that names the step.

Every build step shells out to some tool (sfdisk, mkfs, grub-mkimage, qemu-img, chroot ...);
one wrapper keeps their failures reported alike: the step, the tool, its exit status and the
last lines it printed.
"""

from __future__ import annotations

import subprocess

from vmbuild.errors import BuildError


def run_tool(argv: list[str], what: str, stdin: str | None = None) -> str:
    """Run `argv` (never through a shell); return its stdout, or raise BuildError."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BuildError(f"{what} failed ({argv[0]} exit {proc.returncode}): " + " / ".join(detail))
    return proc.stdout
