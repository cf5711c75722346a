"""Helpers for the runner's end-to-end tests: start ``vmbuild-run`` as a child process, watch
its stdout line by line with timestamps, signal it, look for processes it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Runner:
    """One ``python -m vmbuild.runner run ...`` child and its output."""

    def __init__(self, *args: str | Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, program: list[str] | None = None) -> None:
        """``program``: how to start the runner (default: this Python's -m vmbuild.runner;
        e.g. ["/usr/bin/python3", "-I", "vmbuild-run.pyz"] for the zipapp)."""
        prefix = program or [sys.executable, "-m", "vmbuild.runner"]
        argv = [*prefix, "run", *map(str, args)]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=full_env, cwd=cwd)
        self.lines: list[tuple[float, str]] = []
        self.err: list[str] = []
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True)),
                        threading.Thread(target=self._read, args=(self.proc.stderr, False))]
        for t in self.threads:
            t.daemon = True
            t.start()

    def _read(self, stream: object, out: bool) -> None:
        assert stream is not None
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                if out:
                    self.lines.append((time.monotonic(), line))
                else:
                    self.err.append(line)
                self.cond.notify_all()

    @property
    def numbers(self) -> list[int]:
        return [int(text) for _t, text in self.lines if text.strip().isdigit()]

    def wait_number(self, at_least: int, timeout: float = 240) -> float:
        """Block until the job printed a number >= at_least; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for when, text in self.lines:
                    if text.strip().isdigit() and int(text) >= at_least:
                        return when
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no number >= {at_least}; stdout={self.lines} "
                                         f"stderr={self.err}")
                self.cond.wait(min(left, 1.0))

    def wait_output(self, timeout: float = 240) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(t.strip().isdigit() for _w, t in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no output; stderr={self.err}")
                self.cond.wait(min(left, 1.0))
            return next(w for w, t in self.lines if t.strip().isdigit())

    def wait_err(self, text: str, timeout: float = 240) -> float:
        """Block until a stderr line (the runner's log) contains ``text``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(text in line for line in self.err):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {text!r} in the log; stderr={self.err}")
                self.cond.wait(min(left, 1.0))
        return time.monotonic()

    def signal(self, sig: signal.Signals) -> float:
        when = time.monotonic()
        self.proc.send_signal(sig)
        return when

    def wait(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(10)
        return rc

    def describe(self) -> str:
        return "stdout:\n" + "\n".join(t for _w, t in self.lines) + "\nstderr:\n" + \
            "\n".join(self.err)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (e.g. a work directory: QEMU's disks)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def wait_gone(text: str, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def settled_count(runner: Runner, quiet: float = 1.0, timeout: float = 120) -> int:
    """How many numbers the runner has printed once none arrived for `quiet` seconds: output
    the guest wrote before a pause may still be on its way when the pause is confirmed.
    An event (silence) with a generous bound, not a fixed sleep."""
    deadline = time.monotonic() + timeout
    count, since = len(runner.numbers), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"output never settled: {runner.describe()}"
        time.sleep(0.1)
        if len(runner.numbers) != count:
            count, since = len(runner.numbers), time.monotonic()
    return count
