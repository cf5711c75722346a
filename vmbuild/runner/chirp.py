"""Report the VM's CPU and memory use into the HTCondor job ad (Chirp ``set_job_attr``).

HTCondor accounts for the job's process tree; a VMware VM process started through ``vmrun``
is not in it, and even QEMU's use is better labelled as the guest's. When the job has
``+WantIOProxy = true``, the starter runs a Chirp server and names it in the file
``$_CONDOR_CHIRP_CONFIG`` (``host port cookie``); this module speaks the few lines of that
protocol the runner needs (the same wire format as ``htcondor2.htchirp``), with the standard
library only, since it ships in the runner bundle.

Attributes written: ``VmbuildGuestCpuSeconds``, ``VmbuildGuestCpuUsage`` (cores, over the
last interval), ``VmbuildGuestResidentMiB``, ``VmbuildGuestMemoryMiB`` (configured),
``VmbuildGuestUpdated`` (Unix time). They go with ``set_job_attr`` (through the shadow into the
schedd's job ad), not ``set_job_attr_delayed``: HTCondor 25.0's starter accepts a delayed update
only for names matching ``CHIRP_DELAYED_UPDATE_PREFIX`` (default ``Chirp*``) and drops any other
while still answering 0 ("Got an invalid prefix for updates" in the StarterLog; seen on a real
pool, tests/test_condor_pool.py). One shadow update per attribute per interval is cheap at the
default interval.

This client, not PyPI's ``htchirp``: both were tried against the real 25.0 starter and both set
attributes; ``htchirp`` (1,600 lines for the whole Chirp file API) opens an extra connection in
its constructor to test authentication and prints to stdout (the job's output stream) when its
config file cannot be read, and would add a second package to the bundle for two commands.

The interval between reports is ``vmbuild run --chirp-interval`` (default 60 s,
``RunOptions.chirp_interval``), so that a job ad shows the guest's load within seconds on a
short job, and a long job does not talk to the starter more often than it needs to.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(r"([\\ \n\t\r])")
DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0  # each report is a shadow update: no faster than that


def report_interval(requested: float | None) -> float:
    """Seconds between reports: the requested interval (no shorter than the minimum), or 60."""
    if requested is None or not math.isfinite(requested):
        return DEFAULT_INTERVAL
    return max(MIN_INTERVAL, requested)
_LINE_MAX = 5 * 1024


class ChirpError(OSError):
    """The Chirp server refused a request or the connection failed."""


def chirp_quote(text: str) -> str:
    """Escape backslash, space, newline, tab and CR, as HTCondor's Chirp expects."""
    return _ESCAPE.sub(r"\\\1", text)


class ChirpClient:
    """A minimal Chirp client: cookie authentication and job-attribute updates."""

    def __init__(self, host: str, port: int, cookie: str, timeout: float = 10.0) -> None:
        self.host, self.port, self.cookie, self.timeout = host, port, cookie, timeout

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ChirpClient | None:
        """The job's Chirp server, or None when the job has no I/O proxy."""
        env = os.environ if environ is None else environ
        config = Path(env.get("_CONDOR_CHIRP_CONFIG", ".chirp.config"))
        if not config.is_file() and "_CONDOR_SCRATCH_DIR" in env:
            config = Path(env["_CONDOR_SCRATCH_DIR"]) / ".chirp.config"
        try:
            host, port, cookie = config.read_text().split()[:3]
            return cls(host, int(port), cookie)
        except (OSError, ValueError):
            return None

    def _command(self, sock: socket.socket, line: str) -> str:
        data = line.encode() + b"\n"
        if len(data) > _LINE_MAX:
            raise ChirpError(f"chirp request too long ({len(data)} bytes)")
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ChirpError("the chirp server closed the connection")
            reply += chunk
            if len(reply) > _LINE_MAX:
                raise ChirpError("the chirp server's reply is too long")
        text = reply.decode(errors="replace").strip()
        if text.lstrip("-").isdigit() and int(text) < 0:
            raise ChirpError(f"chirp {line.split()[0]} failed with status {text}")
        return text

    def set_job_attrs(self, attrs: dict[str, str], delayed: bool = False) -> None:
        """Set job attributes to ClassAd expressions (one connection for all of them).

        ``delayed`` batches the update in the starter, but the starter only keeps delayed
        updates of names with the pool's ``CHIRP_DELAYED_UPDATE_PREFIX`` (default ``Chirp*``)
        and silently drops the rest: use it only for such names."""
        verb = "set_job_attr_delayed" if delayed else "set_job_attr"
        try:
            with socket.create_connection((self.host, self.port), self.timeout) as sock:
                sock.settimeout(self.timeout)
                self._command(sock, f"cookie {self.cookie}")
                for name, value in attrs.items():
                    self._command(sock, f"{verb} {chirp_quote(name)} {chirp_quote(value)}")
        except OSError as exc:
            if isinstance(exc, ChirpError):
                raise
            raise ChirpError(f"chirp {self.host}:{self.port}: {exc}") from exc


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float  # user + system, since the process started
    rss_mib: float


def process_usage(pid: int) -> ProcessUsage | None:
    """CPU time and resident memory of ``pid`` from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.M)
    rss = int(match.group(1)) / 1024 if match else 0.0
    return ProcessUsage(cpu, rss)


def vm_pid_for(vmx: str | Path) -> int | None:
    """The ``vmware-vmx`` process running ``vmx`` (vmrun starts it outside our tree)."""
    target = str(Path(vmx).resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"vmware-vmx") and target.encode() in argv:
            return int(entry.name)
    return None


class UsageReporter:
    """Every ``interval`` seconds, put the VM process's CPU and memory into the job ad.

    ``pid`` is a number or a callable returning the current VM pid (None while there is
    none). Failures are counted, never raised: accounting must not break the job.
    """

    def __init__(self, pid: int | Callable[[], int | None], memory_mib: int,
                 client: ChirpClient | None = None, interval: float | None = None) -> None:
        self._pid = pid
        self.memory_mib = memory_mib
        self.client = client if client is not None else ChirpClient.from_env()
        self.interval = report_interval(interval)
        self.failures = 0
        self.reports = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, float] | None = None  # (monotonic time, cpu seconds)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def attributes(self) -> dict[str, str] | None:
        """The attributes for one report (ClassAd expressions), or None without a VM."""
        pid = self._pid() if callable(self._pid) else self._pid
        usage = process_usage(pid) if pid else None
        if usage is None:
            return None
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = max(0.0, (usage.cpu_seconds - self._last[1]) / (now - self._last[0]))
        self._last = (now, usage.cpu_seconds)
        return {
            "VmbuildGuestCpuSeconds": f"{usage.cpu_seconds:.2f}",
            "VmbuildGuestCpuUsage": f"{rate:.3f}",
            "VmbuildGuestResidentMiB": f"{usage.rss_mib:.0f}",
            "VmbuildGuestMemoryMiB": str(self.memory_mib),
            "VmbuildGuestUpdated": str(int(time.time())),
        }

    def report_once(self) -> bool:
        if self.client is None:
            return False
        attrs = self.attributes()
        if attrs is None:
            return False
        try:
            self.client.set_job_attrs(attrs)
        except ChirpError:
            self.failures += 1
            return False
        self.reports += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report_once()

    def start(self) -> UsageReporter:
        """Start reporting in a daemon thread (a no-op without a Chirp server)."""
        if self.client is not None and self._thread is None:
            self.attributes()  # baseline for the first CPU rate
            self._thread = threading.Thread(target=self._loop, name="vmbuild-chirp",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, final_report: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None
            if final_report:
                self.report_once()
