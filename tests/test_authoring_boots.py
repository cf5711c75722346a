"""The authoring loop's boots: `vmbuild shell` gives a root shell instead of the job and
leaves the image as it was; `vmbuild run --console` shows the guest's console live. Real
boots of the hello image under QEMU, driven through a pseudo-terminal as a person would."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


class Terminal:
    """A command on a pseudo-terminal: what it printed, and a way to type into it."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the pty as its terminal
            os.execv(argv[0], argv)
        self.seen = b""

    def wait_for(self, text: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.seen and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:  # the command ended and closed the terminal
                    break
        return text in self.seen

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def exit_status(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.wait_for(b"\0never\0", 1.0)  # keep draining the terminal
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        return None


def vmbuild_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "vmbuild.cli", *map(str, args)]


def test_shell_gives_a_root_shell_instead_of_the_job(hello_vmx: Path) -> None:
    disk = hello_vmx.with_suffix(".vmdk")
    before = disk.stat()
    term = Terminal(vmbuild_argv("shell", hello_vmx))
    found = term.wait_for(b"root@hello", 300)
    Path("/tmp/shell-seen.txt").write_bytes(term.seen)
    assert found, term.seen[-3000:].decode(errors="replace")
    term.type("echo MARK-$((6*7)) $(id -u) $(ls /opt/hello); touch /opt/hello/scribble")
    assert term.wait_for(b"MARK-42 0 main.py", 60), term.seen[-2000:].decode(errors="replace")
    term.type("exit")
    assert term.exit_status(120) == 0, term.seen[-2000:].decode(errors="replace")
    assert b"hello from the guest" not in term.seen  # the job did not run
    after = disk.stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)


def test_run_console_shows_the_guest_console_live(hello_vmx: Path, tmp_path: Path) -> None:
    proc = subprocess.run(vmbuild_argv("run", hello_vmx, "--workdir", tmp_path / "w",
                                       "--console"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hello from the guest" in proc.stdout  # the job's output stays on stdout
    # The console, live: GRUB's line, the job service's own lines (the kernel command line
    # is `quiet`, so the kernel says little before its last words).
    assert "Booting `Debian GNU/Linux'" in proc.stderr
    assert '"event": "started"' in proc.stderr
    assert "reboot: Power down" in proc.stderr
