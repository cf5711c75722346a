"""The VMware backend's lifecycle, against tests/standin/vmrun (a stand-in for VMware's
`vmrun`, not VMware: see that file). Fast: the stand-in's "guest" counts in 0.1 s steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .runner_harness import Runner

STANDIN = Path(__file__).parent / "standin"

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") is None,
    reason="needs qemu-img and mkfs.ext4 for the input/output disks")

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "tiny"
guestOS = "debian12-64"
memsize = "512"
numvcpus = "1"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "tiny.vmdk"
serial0.present = "TRUE"
serial0.fileType = "file"
serial0.fileName = "console.log"
serial1.present = "TRUE"
serial1.fileType = "file"
serial1.fileName = "job.log"
serial2.present = "TRUE"
serial2.fileType = "file"
serial2.fileName = "control.log"
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    out = tmp_path / "image"
    out.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(out / "tiny.vmdk"), "1M"],
                   check=True)
    (out / "tiny.vmx").write_text(VMX)
    return out / "tiny.vmx"


@pytest.fixture
def standin_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{STANDIN}{os.pathsep}{os.environ['PATH']}",
        "VMRUN_STANDIN_STATE": str(tmp_path / "vmrun-state"),
        "VMRUN_STANDIN_INTERVAL": "0.1",
    }


def vmrun(env: dict[str, str], *args: str) -> str:
    full = {**os.environ, **env}
    return subprocess.run([str(STANDIN / "vmrun"), "-T", "ws", *args], env=full,
                          capture_output=True, text=True, check=False).stdout


def running(env: dict[str, str]) -> list[str]:
    lines = vmrun(env, "list").splitlines()
    assert lines[0].startswith("Total running VMs: ")
    assert int(lines[0].split(":")[1]) == len(lines) - 1
    return lines[1:]


def start(image: Path, work: Path, env: dict[str, str], *extra: str) -> Runner:
    return Runner(image, "--backend", "vmware", "--workdir", work, *extra, env=env)


def test_runs_the_job_and_exits_with_its_status(image: Path, tmp_path: Path,
                                                standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "5", "VMRUN_STANDIN_STATUS": "3"}
    out = tmp_path / "out"
    runner = start(image, tmp_path / "work", env, "--input", str(image), "--output-dir", str(out))
    assert runner.wait(60) == 3, runner.describe()
    assert out.is_dir() and list(out.iterdir()) == []  # the stand-in's job writes no outputs
    assert runner.numbers == [1, 2, 3, 4, 5]
    assert running(env) == []
    # the image itself was never run: VMware ran a copy in the work directory
    assert not (image.parent / "job.log").exists()
    assert json.loads((tmp_path / "work" / "result.json").read_text())["status"] == 3


def test_suspend_resume_cycles_and_move(image: Path, tmp_path: Path,
                                        standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "60"}
    work = tmp_path / "work"
    seen: list[int] = []
    for cycle in range(3):
        if cycle == 2:
            moved = tmp_path / "moved" / "work"
            moved.parent.mkdir()
            shutil.move(str(work), moved)
            work = moved
        runner = start(image, work, env)
        runner.wait_number((seen[-1] if seen else 0) + 5, timeout=60)
        sent = runner.signal(signal.SIGUSR1 if cycle != 1 else signal.SIGTERM)
        assert runner.wait(60) == 85, runner.describe()
        assert time.monotonic() - sent < 10
        seen += runner.numbers
        vm = work / "vm"
        assert (vm / "tiny.vmss").exists(), "VMware keeps a .vmss after suspend"
        assert not (vm / "tiny.vmx.lck").exists()
        assert running(env) == []
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    seen += last.numbers
    assert seen == list(range(1, 61))
    boots = {e.get("boot_id") for e in last_events(work) if e["event"] == "started"}
    assert len(boots) == 1


def last_events(work: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (work / "control.log").read_text().splitlines()
            if line.startswith("{")]


def test_suspend_slower_than_the_grace_time(image: Path, tmp_path: Path,
                                            standin_env: dict[str, str]) -> None:
    """The scheduler's SIGKILL comes while VMware is still suspending: VMware finishes, and
    the next run resumes the VM instead of losing it."""
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40", "VMRUN_STANDIN_SUSPEND_DELAY": "3"}
    work = tmp_path / "work"
    first = start(image, work, env)
    first.wait_number(5, timeout=60)
    first.signal(signal.SIGUSR1)
    time.sleep(0.8)  # the grace time: shorter than the suspend
    first.signal(signal.SIGKILL)
    first.wait(30)
    printed = set(first.numbers)
    second = start(image, work, env)
    assert second.wait(60) == 0, second.describe()
    assert any("still running" in line for line in second.err), second.describe()
    # nothing lost: together the runs printed every number, the VM never restarted the count
    assert printed | set(second.numbers) == set(range(1, 41))
    assert second.numbers[-1] == 40
    assert len({e.get("boot_id") for e in last_events(work) if e["event"] == "started"}) == 1
    assert running(env) == []


def test_vm_left_running_by_a_killed_runner(image: Path, tmp_path: Path,
                                            standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "50"}
    work = tmp_path / "work"
    first = start(image, work, env)
    first.wait_number(5, timeout=60)
    first.signal(signal.SIGKILL)
    first.wait(30)
    assert len(running(env)) == 1, "the stand-in VM outlives a killed runner, as VMware's"
    second = start(image, work, env)
    assert second.wait(60) == 0, second.describe()
    assert any("still running" in line for line in second.err), second.describe()
    assert set(first.numbers) | set(second.numbers) == set(range(1, 51))
    assert running(env) == []


def test_pause_and_unpause(image: Path, tmp_path: Path, standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    runner = start(image, tmp_path / "work", env)
    runner.wait_number(3, timeout=60)
    runner.signal(signal.SIGTSTP)
    time.sleep(1.0)
    before = len(runner.numbers)
    time.sleep(1.0)
    assert len(runner.numbers) == before
    runner.signal(signal.SIGCONT)
    assert runner.wait(60) == 0, runner.describe()
    assert runner.numbers == list(range(1, 31))


def test_periodic_checkpoints(image: Path, tmp_path: Path, standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30", "VMRUN_STANDIN_SUSPEND_DELAY": "0.1"}
    runner = start(image, tmp_path / "work", env, "--checkpoint-every", "1s")
    assert runner.wait(90) == 0, runner.describe()
    assert runner.numbers == list(range(1, 31))
    assert sum("VM suspended" in line for line in runner.err) >= 2, runner.describe()
