"""The runner's Chirp reporting, against a small Chirp server that records what it gets,
and checked line for line against HTCondor's own client (htcondor2.htchirp)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
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
    assert server.lines == ["cookie s3cr3t", 'set_job_attr VmbuildNote "two\\ words"',
                            "set_job_attr VmbuildN 3"]
    server.lines.clear()
    client.set_job_attrs({"ChirpVmbuildN": "4"}, delayed=True)
    assert server.lines == ["cookie s3cr3t", "set_job_attr_delayed ChirpVmbuildN 4"]


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
        chirp.set_job_attr("VmbuildX", value)
    theirs = [line for line in server.lines if line.startswith("set_job_attr")]
    server.lines.clear()
    ChirpClient("127.0.0.1", server.port, COOKIE).set_job_attrs({"VmbuildX": value})
    ours = [line for line in server.lines if line.startswith("set_job_attr")]
    assert ours == theirs
    assert chirp_quote("a b\tc\\") == htchirp.htchirp.quote("a b\tc\\")


def _reported(server: FakeChirpServer, name: str) -> list[str]:
    """Every value the server received for attribute `name`, in order."""
    values = []
    for line in list(server.lines):
        if line.startswith(f"set_job_attr {name} "):
            values.append(line.split(" ", 2)[2])
    return values


def test_usage_reporter_reports_the_vm_process(server: FakeChirpServer) -> None:
    """The reporter puts a busy process's CPU and memory into the job ad. Waits for reports
    (an event), not for a fixed time: on a loaded machine the busy loop may get no CPU at all
    in one short window, so the test needs reports showing CPU use, however long that takes
    (bounded generously)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        client = ChirpClient("127.0.0.1", server.port, COOKIE)
        reporter = UsageReporter(busy.pid, memory_mib=512, client=client, interval=0.5)
        reporter.start()
        deadline = time.monotonic() + 120
        while True:
            usages = [float(v) for v in _reported(server, "VmbuildGuestCpuUsage")]
            if reporter.reports >= 2 and any(u > 0 for u in usages):
                break
            assert time.monotonic() < deadline, f"no report with CPU use in 120 s: {usages}"
            threading.Event().wait(0.2)
        reporter.stop()
    finally:
        busy.kill()
        busy.wait()
    rates = [float(v) for v in _reported(server, "VmbuildGuestCpuUsage")]
    assert reporter.reports >= 2 and reporter.failures == 0
    assert len(rates) == reporter.reports  # one CPU rate per report, the final one included
    assert _reported(server, "VmbuildGuestMemoryMiB")[-1] == "512"
    # A busy loop: its CPU time grows, and the periodic rates (windows of about `interval`)
    # never exceed one core. The final report's window (since the last periodic one, up to
    # stop) may be a few milliseconds, where one clock tick of CPU time is a large rate, so
    # it is left out of the bound.
    assert float(_reported(server, "VmbuildGuestCpuSeconds")[-1]) > 0
    periodic = rates[:-1]
    assert any(r > 0 for r in periodic) and all(0 <= r <= 1.5 for r in periodic), rates
    assert float(_reported(server, "VmbuildGuestResidentMiB")[-1]) > 1


def test_reporter_without_chirp_or_process_is_quiet() -> None:
    reporter = UsageReporter(lambda: None, memory_mib=1, client=None)
    assert not reporter.enabled and not reporter.report_once()
    reporter.start().stop()
    assert process_usage(os.getpid()) is not None
    assert process_usage(2**22 + 12345) is None


def test_interval_from_the_runner_option(tmp_path: Path) -> None:
    """`vmbuild run --chirp-interval` is a run option the reporter gets; without it the
    interval is 60 s, a tiny one is raised to the minimum, a bad one is a usage error."""
    from vmbuild.runner import main as runner_main
    from vmbuild.runner.chirp import DEFAULT_INTERVAL, MIN_INTERVAL, report_interval
    from vmbuild.runner.core import RunnerError

    assert report_interval(None) == DEFAULT_INTERVAL == 60.0
    assert report_interval(5) == 5.0
    assert report_interval(0.01) == MIN_INTERVAL
    assert report_interval(float("nan")) == DEFAULT_INTERVAL
    assert UsageReporter(1, 512, client=None).interval == DEFAULT_INTERVAL
    assert UsageReporter(1, 512, client=None, interval=120.0).interval == 120.0
    vmx = tmp_path / "x.vmx"
    vmx.write_text("")
    parser = runner_main.build_parser()
    options = runner_main.options_from(parser.parse_args(["run", str(vmx),
                                                          "--chirp-interval", "2m"]))
    assert options.chirp_interval == 120.0
    assert runner_main.options_from(parser.parse_args(["run", str(vmx)])).chirp_interval is None
    for bad in ("soon", "0s"):
        with pytest.raises(RunnerError) as err:
            runner_main.options_from(parser.parse_args(["run", str(vmx), "--chirp-interval", bad]))
        assert err.value.exit_code == 2 and "--chirp-interval" in str(err.value)
