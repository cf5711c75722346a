"""A real one-machine HTCondor pool on this machine, as a pytest fixture.

The pool comes from the prebuilt HTCondor tarball (``$VMBUILD_HTCONDOR_TARBALL``, else
``<repo>/../shared/htcondor/htcondor-*-debian12-amd64.tar.xz``; see that directory's
README.md): it is unpacked into a temporary directory, given a configuration of its own there
(``CONDOR_CONFIG`` points at it: the machine's own configuration is never read or touched)
and ``condor_master -f`` is started as an unprivileged user, because the schedd refuses
root's jobs. As root that is the suite's test user ``vmbuild-test`` (made when missing, as
tests/test_rootless.py does); as anybody else it is the current user.

The settings are those of ``personal-pool.sh``: loopback only, no cgroups (PID 1 is not
systemd here), no GPU discovery (the startd would exit), short intervals so that a job
matches in seconds. The vmbuild probe is installed as a STARTD_CRON hook the way
``vmbuild probe --condor-config`` prints it, since every generated submit file requires its
attributes. Without a tarball the tests are skipped with a reason saying how to get one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmbuild.tools import find_tool

REPO = Path(__file__).resolve().parents[1]
TEST_USER = "vmbuild-test"  # the same unprivileged user as tests/test_rootless.py
START_TIMEOUT = 180.0  # the probe's bounded KVM test takes ~10 s; the pool ~2 s
NO_TARBALL = ("no HTCondor tarball: set VMBUILD_HTCONDOR_TARBALL or put "
              "htcondor-*-debian12-amd64.tar.xz into ../shared/htcondor/ (its README.md says "
              "how it is built from the upstream v25.0 source)")


def find_tarball() -> Path | None:
    """The HTCondor release to test against, or None when there is none here."""
    given = os.environ.get("VMBUILD_HTCONDOR_TARBALL")
    if given:
        path = Path(given)
        if not path.is_file():
            raise AssertionError(f"VMBUILD_HTCONDOR_TARBALL={given}: no such file")
        return path
    found = sorted((REPO.parent / "shared" / "htcondor").glob("htcondor-*-debian12-amd64.tar.xz"))
    return found[-1] if found else None


def pool_user() -> pwd.struct_passwd:
    """The unprivileged user that runs the pool and submits its jobs."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run([find_tool("useradd") or "useradd", "--create-home", "--shell",
                        "/bin/bash", TEST_USER], check=True)
        return pwd.getpwnam(TEST_USER)


def _as_user_kwargs(user: pwd.struct_passwd) -> dict[str, object]:
    """Popen arguments that run a child as ``user`` (nothing when that is us already)."""
    if os.geteuid() == user.pw_uid:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    """Give ``path`` and everything below it to ``user`` (a no-op when not root)."""
    if os.geteuid() != 0:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


# Loads what `vmbuild submit` loads (typer imports some packages only when a command runs;
# writing the runner bundle imports qemu.qmp), then names every module file.
_LIST_CLI_MODULES = """
import contextlib, sys
import vmbuild.cli, vmbuild.schedulers.submit, vmbuild.runner.bundle
vmbuild.runner.bundle.bundle_members()
with contextlib.suppress(SystemExit):
    sys.argv = ["vmbuild", "submit", "--help"]
    vmbuild.cli.main()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f:
        print("FILE:" + f)
"""


@dataclass
class CondorPool:
    root: Path
    user: pwd.struct_passwd
    master: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def release(self) -> Path:
        return self.root / "release"

    @property
    def local(self) -> Path:
        return self.root / "local"

    @property
    def config(self) -> Path:
        return self.local / "condor_config"

    @property
    def env(self) -> dict[str, str]:
        """The pool user's environment for HTCondor's tools: this pool's config only."""
        return {"CONDOR_CONFIG": str(self.config), "HOME": self.user.pw_dir,
                "USER": self.user.pw_name, "LOGNAME": self.user.pw_name, "LANG": "C.UTF-8",
                "PATH": f"{self.release}/bin:{self.release}/sbin:/usr/local/bin:/usr/bin:/bin"}

    def run(self, *argv: str | Path, check: bool = True, timeout: float = 120,
            cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command as the pool user, with this pool's configuration."""
        proc = subprocess.run([str(a) for a in argv], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL,
                              **_as_user_kwargs(self.user))  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc  # type: ignore[no-any-return]

    def vmbuild_argv(self) -> list[str]:
        """How the pool user runs ``python -m vmbuild.cli``: this interpreter when the user
        may run it; else Debian's python3 with this checkout and its venv's packages on the
        path (a venv made from root's pyenv is not executable by other users); else, when the
        checkout itself is closed to other users (as CI's may be), Debian's python3 with a
        copy of just the modules ``vmbuild.cli`` loads, in the pool's directory."""
        with contextlib.suppress(OSError):  # EACCES on the interpreter: no exit status
            if self.run(sys.executable, "-c", "import vmbuild.cli",
                        check=False).returncode == 0:
                return [sys.executable, "-m", "vmbuild.cli"]
        site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
        paths: list[Callable[[], list[str]]] = [lambda: [str(REPO), *site],
                                                lambda: [str(self._copy_cli_modules())]]
        for path in paths:  # the copy only when the checkout is closed to the pool user
            argv = ["/usr/bin/env", f"PYTHONPATH={':'.join(path())}", "/usr/bin/python3"]
            if self.run(*argv, "-c", "import vmbuild.cli", check=False).returncode == 0:
                return [*argv, "-m", "vmbuild.cli"]
        raise AssertionError(f"the pool user {self.user.pw_name} cannot run vmbuild.cli")

    def _copy_cli_modules(self) -> Path:
        """Copy the top-level packages/modules that ``import vmbuild.cli`` loads from this
        checkout or the venv into ``ROOT/pylib`` (readable by the pool user)."""
        target = self.root / "pylib"
        listing = subprocess.run(
            [sys.executable, "-c", _LIST_CLI_MODULES], capture_output=True, text=True,
            check=True, cwd=REPO)
        bases = [Path(p) for p in sys.path if p.endswith("site-packages")] + [REPO]
        for line in listing.stdout.splitlines():
            if not line.startswith("FILE:"):
                continue
            file = Path(line[5:])
            base = next((b for b in bases if file.is_relative_to(b)), None)
            if base is None:
                continue  # the standard library: Debian's python3 has its own
            top = base / file.relative_to(base).parts[0]
            dest = target / top.name
            if dest.exists():
                continue
            if top.is_dir():
                shutil.copytree(top, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(top, dest)
        target.mkdir(exist_ok=True)
        chown_tree(target, self.user)
        return target

    def mkdir(self, name: str) -> Path:
        """A directory for one test's files (submit side), owned by the pool user."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root / "jobs"))
        path.chmod(0o755)
        chown_tree(path, self.user)
        return path

    # --- the job queue
    def submit(self, submit_file: Path) -> int:
        proc = self.run("condor_submit", "-terse", submit_file.name, cwd=submit_file.parent)
        return int(proc.stdout.split(".")[0])

    def q(self, cluster: int, *attrs: str) -> list[list[str]]:
        """``condor_q -af`` rows for the cluster's jobs still in the queue."""
        out = self.run("condor_q", str(cluster), "-af:t", *attrs).stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def history(self, cluster: int, *attrs: str) -> list[list[str]]:
        out = self.run("condor_history", str(cluster), "-af:t", *attrs).stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def wait_done(self, cluster: int, timeout: float,
                  on_poll: Callable[[], object] | None = None) -> None:
        """Until no job of ``cluster`` is left in the queue (held jobs fail the wait);
        ``on_poll`` is called at every look (to watch the spool, say)."""
        deadline = time.monotonic() + timeout
        while True:
            if on_poll is not None:
                on_poll()
            rows = self.q(cluster, "ProcId", "JobStatus", "HoldReason")
            if not rows:
                return
            held = [r for r in rows if r[1] == "5"]
            if held:
                raise AssertionError(f"job {cluster} held: {held}\n{self.logs_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {cluster} still queued after {timeout} s: {rows}")
            time.sleep(1.0)

    def wait_for(self, what: str, predicate: object, timeout: float,
                 interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not after {timeout} s\n{self.logs_tail()}")
            time.sleep(interval)

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for name in ("StarterLog", "ShadowLog", "SchedLog", "StartLog"):
            path = self.local / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        for path in sorted((self.local / "log").glob("StarterLog.*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def spool_bytes(self, cluster: int, proc: int = 0) -> int:
        """What the schedd holds for a job now (eviction and checkpoint transfers land in
        ``spool/CLUSTER/PROC``; HTCondor may split the cluster directory by ``CLUSTER % 10000``)."""
        total = 0
        for top in (self.local / "spool").glob(f"**/{cluster}/{proc}"):
            for path in top.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file():
                        total += path.stat().st_size
        return total

    def machine(self, *attrs: str) -> list[str]:
        out = self.run("condor_status", "-af:t", *attrs, check=False).stdout.strip()
        return out.splitlines()[0].split("\t") if out else []

    # --- life cycle
    def write_config(self, probe_config: str) -> None:
        uid, gid = self.user.pw_uid, self.user.pw_gid
        text = f"""\
RELEASE_DIR = {self.release}
LOCAL_DIR = {self.local}
LOCAL_CONFIG_DIR = $(LOCAL_DIR)/config.d
LOCK = $(LOCAL_DIR)/lock
RUN = $(LOCAL_DIR)/run
SEC_PASSWORD_DIRECTORY = $(LOCAL_DIR)/passwords.d
SEC_TOKEN_SYSTEM_DIRECTORY = $(LOCAL_DIR)/tokens.d
SEC_TOKEN_DIRECTORY = $(SEC_TOKEN_SYSTEM_DIRECTORY)
CONDOR_IDS = {uid}.{gid}
use role : personal
use security : user_based
NETWORK_INTERFACE = 127.0.0.1
SHARED_PORT_PORT = 0
MAIL = /bin/true
SENDMAIL = /bin/true
# PID 1 is not systemd here and cgroup delegation is not available
BASE_CGROUP =
CGROUP_MEMORY_LIMIT_POLICY = none
DISCARD_SESSION_KEYRING_ON_STARTUP = false
UPDATE_INTERVAL = 2
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 2
NEGOTIATOR_CYCLE_DELAY = 2
SCHEDD_INTERVAL = 5
STARTER_UPDATE_INTERVAL = 2
STARTER_INITIAL_UPDATE_INTERVAL = 2
SHADOW_QUEUE_UPDATE_INTERVAL = 2
NUM_CPUS = 2
MEMORY = 8192
# built without condor_gpu_discovery: without this the startd exits at start-up
STARTD_DETECT_GPUS =
# keep evicted and removed jobs' sandboxes inspectable only as long as the starter runs
"""
        self.config.write_text(text)
        (self.local / "config.d" / "50-vmbuild.conf").write_text(probe_config)

    def start(self, probe_config: str) -> None:
        for sub in ("log", "spool", "execute", "lock", "run", "config.d", "passwords.d",
                    "tokens.d"):
            (self.local / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        self.write_config(probe_config)
        chown_tree(self.local, self.user)
        chown_tree(self.root / "jobs", self.user)
        began = time.monotonic()
        log = open(self.local / "log" / "master.out", "wb")  # noqa: SIM115 - the daemon's
        self.master = subprocess.Popen(  # type: ignore[call-overload]
            [str(self.release / "sbin" / "condor_master"), "-f"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.local, **_as_user_kwargs(self.user))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.master is not None
            if self.master.poll() is not None:
                raise RuntimeError(f"condor_master exited {self.master.returncode}:\n"
                                   f"{self.logs_tail()}")
            # the probe's attributes too: every generated submit file requires them
            row = self.machine("Name", "VMBUILD_QEMU")
            if len(row) == 2 and row[1] in ("true", "false"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no startd with the vmbuild probe's attributes after "
                                   f"{START_TIMEOUT} s: {row}\n{self.logs_tail()}")
            time.sleep(0.5)
        self.timings["pool start (startd + probe)"] = time.monotonic() - began

    def daemon_pids(self) -> list[int]:
        """The master's descendants (the daemons, starters and their jobs), by /proc."""
        if self.master is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.master.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                found.append(child)
                todo.append(child)
        return found

    def stop(self) -> None:
        """Fast shutdown through the master (SIGQUIT), then SIGKILL to what is left, by pid."""
        if self.master is None:
            return
        pids = self.daemon_pids()
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGQUIT)
            try:
                self.master.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.master = None


def start_pool(root: Path, tarball: Path) -> CondorPool:
    """Unpack ``tarball`` under ``root`` and start a pool there; call ``stop()`` after."""
    user = pool_user()
    pool = CondorPool(root=root, user=user)
    pool.release.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    subprocess.run(["tar", "-xJf", str(tarball), "-C", str(pool.release),
                    "--strip-components=1"], check=True, timeout=300)
    pool.timings["unpack"] = time.monotonic() - began
    bundle = root / "vmbuild-run.pyz"
    from vmbuild.runner.bundle import write_bundle

    write_bundle(bundle)
    bundle.chmod(0o755)
    probe = subprocess.run([sys.executable, "-m", "vmbuild.cli", "probe", "--condor-config",
                            "--runner", str(bundle)], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    assert re.search(r"^STARTD_CRON_VMBUILD_EXECUTABLE", probe, re.M), probe
    try:
        pool.start(probe)
    except BaseException:
        pool.stop()
        raise
    return pool


@pytest.fixture(scope="session")
def condor_pool() -> Iterator[CondorPool]:
    """A running one-machine pool for the session (skipped only without a tarball)."""
    tarball = find_tarball()
    if tarball is None:
        pytest.skip(NO_TARBALL)
    if shutil.which("xz") is None:
        raise AssertionError("xz is missing: run scripts/setup.sh")
    # /var/tmp: on disk (images are hundreds of MiB) and traversable by the pool user
    root = Path(tempfile.mkdtemp(prefix="vmbuild-condor-", dir="/var/tmp"))
    root.chmod(0o755)
    pool = start_pool(root, tarball)
    try:
        yield pool
    finally:
        pool.stop()
        shutil.rmtree(root, ignore_errors=True)
