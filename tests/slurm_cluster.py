"""A real one-node Slurm cluster on this machine, as a pytest fixture.

Needs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge``, which
``scripts/setup.sh`` installs (a missing one fails the test: it is never skipped), writes a
``slurm.conf`` for this host in a temporary directory, starts munged (unless one already
answers), slurmctld and slurmd in the foreground as children of the test process, waits
until ``sinfo`` shows the node idle, and stops them at the end. No systemd or cgroups:
``proctrack/linuxproc``, ``task/none``.

Use it with ``from tests.slurm_cluster import slurm_cluster`` in a test module, or call
:func:`start_cluster` directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 60
# How long a requeued job waits before it may start again: Slurm uses the credential
# lifetime (AuthInfo cred_expire, default 120 s); a short one keeps the tests quick.
CRED_EXPIRE = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_installed() -> None:
    """Fail (never skip) when Slurm or MUNGE is missing: scripts/setup.sh installs them, so a
    missing daemon is a broken set-up that must not turn the Slurm tests into a green skip.
    Nothing is installed here: a test that runs apt-get hides a setup.sh that does not."""
    needed = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge",
              "unmunge", "mungekey")
    missing = [tool for tool in needed
               if not (shutil.which(tool) or Path("/usr/sbin", tool).exists())]
    if missing:
        raise AssertionError(f"Slurm/MUNGE tools missing: {', '.join(missing)} (scripts/setup.sh "
                             "installs slurmctld slurmd slurm-client munge; run it as root)")


def _munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return dec.returncode == 0


def _start_munged() -> int | None:
    """Start munged unless one answers; returns the pid of the one started here."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True,
                   timeout=30)
    deadline = time.monotonic() + 15
    while not _munge_works():
        if time.monotonic() > deadline:
            raise AssertionError("munged was started but munge -n | unmunge does not work")
        time.sleep(0.2)
    pid_file = Path("/run/munge/munged.pid")
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def _node_line(node: str) -> str:
    """``NodeName=...`` with this machine's real CPUs and memory (from ``slurmd -C``)."""
    proc = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                          check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName="))
    line = re.sub(r"^NodeName=\S+", f"NodeName={node} NodeAddr=127.0.0.1", line)
    return line + " State=UNKNOWN"


@dataclass
class SlurmCluster:
    root: Path
    node: str
    kill_wait: int
    ctld_port: int
    d_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    munged_pid: int | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for clients (and the jobs they submit: sbatch exports it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        r = self.root
        text = f"""\
ClusterName=vmbuildtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire={CRED_EXPIRE}
CredType=cred/munge
SlurmctldPort={self.ctld_port}
SlurmdPort={self.d_port}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
KillWait={self.kill_wait}
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
InactiveLimit=0
MinJobAge=3600
SchedulerType=sched/builtin
{_node_line(self.node)}
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.conf)

    def run(self, *argv: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def sbatch(self, script: Path, *options: str) -> int:
        proc = self.run("sbatch", "--parsable", *options, str(script))
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout.strip()
        fields: dict[str, str] = {}
        for token in re.split(r" (?=[A-Za-z/:]+=)", out):
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait_for(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}")
            time.sleep(0.5)

    def set_kill_wait(self, seconds: int) -> None:
        """Change KillWait on the running cluster (rewrite slurm.conf, reconfigure)."""
        self.kill_wait = seconds
        self.write_conf()
        self.run("scontrol", "reconfigure")
        deadline = time.monotonic() + 30
        while f"KillWait                = {seconds} sec" not in \
                self.run("scontrol", "show", "config").stdout:
            if time.monotonic() > deadline:
                raise AssertionError(f"KillWait did not change to {seconds}")
            time.sleep(0.5)

    def wait_idle(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({p.args!r}): see {self.root}/*.log")
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            last = proc.stdout.strip() + proc.stderr.strip()
            if proc.returncode == 0 and f"{self.node} idle" in last:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle in {timeout} s (sinfo: {last!r}); "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.munged_pid, signal.SIGTERM)
            self.munged_pid = None


def start_cluster(root: Path, kill_wait: int = 30) -> SlurmCluster:
    """Start a one-node cluster with its files under ``root``; call ``stop()`` after."""
    ensure_installed()
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(root=root, node=socket.gethostname().split(".")[0],
                           kill_wait=kill_wait, ctld_port=_free_port(), d_port=_free_port())
    cluster.munged_pid = _start_munged()
    cluster.write_conf()
    try:
        for daemon in ("slurmctld", "slurmd"):
            log = open(root / f"{daemon}.console", "wb")  # noqa: SIM115 - lives with the daemon
            cluster.procs.append(subprocess.Popen(
                [daemon, "-D", "-f", str(cluster.conf)], env=cluster.env, cwd=root,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True))
            log.close()
            if daemon == "slurmctld":
                time.sleep(1.0)
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster for the session (KillWait 10 s to start with)."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"), kill_wait=10)
    try:
        yield cluster
    finally:
        cluster.stop()
