"""The runner's Chirp reporting, against a small Chirp server that records what it gets,
and checked line for line against HTCondor's own client (htcondor2.htchirp)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbuild.runner.chirp import (
    ChirpClient,
    ChirpError,
    UsageReporter,
    chirp_quote,
    process_usage,
)

COOKIE = "s3cr3t"


class FakeChirpServer:
    """Accepts connections; answers 0 to a right cookie and to set_job_attr*, -1 otherwise."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                authed = False
                for raw in f:
                    line = raw.decode().rstrip("\n")
                    self.lines.append(line)
                    if line.startswith("cookie "):
                        authed = line == f"cookie {COOKIE}"
                        conn.sendall(b"0\n" if authed else b"-1\n")
                    elif line.startswith("set_job_attr") and authed:
                        conn.sendall(b"0\n")
                    else:
                        conn.sendall(b"-1\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[FakeChirpServer]:
    srv = FakeChirpServer()
    yield srv
    srv.close()


def test_client_from_env(tmp_path: Path, server: FakeChirpServer) -> None:
    assert ChirpClient.from_env({"_CONDOR_CHIRP_CONFIG": str(tmp_path / "none")}) is None
    config = tmp_path / ".chirp.config"
    config.write_text(f"127.0.0.1 {server.port} {COOKIE}\n")
    client = ChirpClient.from_env({"_CONDOR_CHIRP_CONFIG": str(config)})
    assert client is not None and client.port == server.port
    client.set_job_attrs({"VmbuildNote": '"two words"', "VmbuildN": "3"})
    assert server.lines == ["cookie s3cr3t", 'set_job_attr_delayed VmbuildNote "two\\ words"',
                            "set_job_attr_delayed VmbuildN 3"]


def test_wrong_cookie_or_no_server_raises(server: FakeChirpServer) -> None:
    with pytest.raises(ChirpError):
        ChirpClient("127.0.0.1", server.port, "wrong").set_job_attrs({"A": "1"})
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ChirpError):
        ChirpClient("127.0.0.1", port, COOKIE, timeout=2).set_job_attrs({"A": "1"})


def test_same_wire_format_as_htchirp(server: FakeChirpServer) -> None:
    htchirp = pytest.importorskip("htcondor2.htchirp")
    value = '"a b\\c"'
    with htchirp.HTChirp(host="127.0.0.1", port=server.port, cookie=COOKIE) as chirp:
        chirp.set_job_attr_delayed("VmbuildX", value)
    theirs = [line for line in server.lines if line.startswith("set_job_attr")]
    server.lines.clear()
    ChirpClient("127.0.0.1", server.port, COOKIE).set_job_attrs({"VmbuildX": value})
    ours = [line for line in server.lines if line.startswith("set_job_attr")]
    assert ours == theirs
    assert chirp_quote("a b\tc\\") == htchirp.htchirp.quote("a b\tc\\")


def test_usage_reporter_reports_the_vm_process(server: FakeChirpServer) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\n"
                             "while time.time()-t<30: pass"])
    try:
        client = ChirpClient("127.0.0.1", server.port, COOKIE)
        reporter = UsageReporter(busy.pid, memory_mib=512, client=client, interval=0.5)
        reporter.start()
        threading.Event().wait(1.6)
        reporter.stop()
    finally:
        busy.kill()
        busy.wait()
    assert reporter.reports >= 2 and reporter.failures == 0
    attrs = {}
    for line in server.lines:
        if line.startswith("set_job_attr_delayed "):
            _, name, value = line.split(" ", 2)
            attrs[name] = value
    assert attrs["VmbuildGuestMemoryMiB"] == "512"
    # A busy loop: CPU time grows (how fast depends on what else this machine runs).
    assert float(attrs["VmbuildGuestCpuSeconds"]) > 0.05
    assert 0.05 < float(attrs["VmbuildGuestCpuUsage"]) <= 1.5  # at most one core
    assert float(attrs["VmbuildGuestResidentMiB"]) > 1


def test_reporter_without_chirp_or_process_is_quiet() -> None:
    reporter = UsageReporter(lambda: None, memory_mib=1, client=None)
    assert not reporter.enabled and not reporter.report_once()
    reporter.start().stop()
    assert process_usage(os.getpid()) is not None
    assert process_usage(2**22 + 12345) is None
