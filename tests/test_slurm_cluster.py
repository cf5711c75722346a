"""The generated sbatch script on a real one-node Slurm cluster (slurmctld + slurmd + munge
on localhost, from Debian's packages), with a fake runner that keeps the runner's
checkpoint contract (tests/fake_runner.py), so no VM is needed. The lead runs the same with
the real runner by pointing ``runner_command`` at it."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.scheduler_images import make_image
from tests.slurm_cluster import SlurmCluster, slurm_cluster
from vmbuild.runner.contract import CONTROL_LOG, parse_control
from vmbuild.schedulers import SubmitOptions, write_submission

__all__ = ["slurm_cluster"]

pytestmark = pytest.mark.slow
FAKE = Path(__file__).with_name("fake_runner.py")
DONE = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"}


def _script(tmp: Path, count: int, interval: float, save: float, **opts: object) -> Path:
    vmx = make_image(tmp / "image", memory_mib=256)
    options = SubmitOptions(
        runner_command=[sys.executable, str(FAKE), "--count", str(count), "--interval",
                        str(interval), "--save-seconds", str(save)],
        work_root=str(tmp / "work"), request_memory_mib=200, **opts)  # type: ignore[arg-type]
    files = write_submission(vmx, "slurm", tmp / "submit", options, bundle=False)
    assert files == [tmp / "submit" / "hello.sbatch"]
    return files[0]


def _numbers(text: str) -> list[int]:
    return [int(line) for line in text.splitlines() if re.fullmatch(r"\d+", line)]


def _wait_for_number(out: Path, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and any(n >= at_least for n in _numbers(out.read_text())):
            return
        time.sleep(0.2)
    raise AssertionError(f"{out} never reached {at_least}: "
                         f"{out.read_text() if out.exists() else '(no file)'}")


def test_trivial_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/hello-%j.out\n"
                      "echo hello from job $SLURM_JOB_ID on $(hostname)\n")
    job = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait_for(job, DONE, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert f"hello from job {job}" in (tmp_path / f"hello-{job}.out").read_text()


def test_requeue_checkpoints_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scontrol requeue mid-run: the runner saves within KillWait, the job requeues (same id),
    the script finds the checkpoint in its work directory, and the count finishes whole."""
    slurm_cluster.set_kill_wait(10)
    script = _script(tmp_path, count=30, interval=0.3, save=2.0)
    job = slurm_cluster.sbatch(script)
    out = tmp_path / "submit" / f"hello-{job}.out"
    _wait_for_number(out, 8, timeout=60)
    slurm_cluster.run("scontrol", "requeue", str(job))
    info = slurm_cluster.wait_for(job, DONE, timeout=120)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert info["Restarts"] == "1", info
    assert _numbers(text) == list(range(1, 31)), text  # nothing lost, nothing repeated
    assert re.search(r"SIGTERM: saving at (\d+)", text), text
    saved = re.search(r"checkpoint published at (\d+) after ([\d.]+) s", text)
    assert saved and float(saved.group(2)) < slurm_cluster.kill_wait, text
    assert f"fake-runner: resumed at {saved.group(1)}" in text
    assert "resuming from" in text  # the script saw the checkpoint in the work directory
    assert (tmp_path / "submit" / f"hello-outputs.{job}" / "done.txt").exists()
    assert not (tmp_path / "work" / str(job)).exists()  # cleaned after success


def test_short_killwait_loses_without_signal_lead(slurm_cluster: SlurmCluster,
                                                  tmp_path: Path) -> None:
    """KillWait (2 s) shorter than the save (6 s): at the time limit Slurm's SIGTERM starts the
    save and SIGKILL ends it; no checkpoint is published and the job ends TIMEOUT, its count
    incomplete. This is the paper's failure, with the script's --signal lead turned off."""
    slurm_cluster.set_kill_wait(2)
    script = _script(tmp_path, count=400, interval=0.5, save=6.0, time_limit="1",
                     signal_lead=False)
    assert "--signal" not in script.read_text()
    job = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait_for(job, DONE, timeout=240)
    text = (tmp_path / "submit" / f"hello-{job}.out").read_text()
    assert info["JobState"] == "TIMEOUT", (info, text)
    assert "saving at" in text and "checkpoint published" not in text, text
    assert not (tmp_path / "work" / str(job) / "checkpoint.json").exists()
    assert max(_numbers(text)) < 400


def test_short_killwait_safe_with_signal_lead(slurm_cluster: SlurmCluster,
                                              tmp_path: Path) -> None:
    """Same KillWait (2 s) and save (6 s), with the script as vmbuild writes it: USR1 comes
    N s (the suspend estimate) before the time limit, the runner saves with time to spare,
    the script requeues the job, and the count finishes whole over several allocations."""
    slurm_cluster.set_kill_wait(2)
    count = 160  # 80 s of counting: more than one 1-minute allocation
    script = _script(tmp_path, count=count, interval=0.5, save=6.0, time_limit="1",
                     measured_suspend_s=6.0, suspend_floor_s=20)
    text = script.read_text()
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", text).group(1))  # type: ignore[union-attr]
    assert 6 < lead < 60
    job = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait_for(job, DONE, timeout=600)
    out = (tmp_path / "submit" / f"hello-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert int(info["Restarts"]) >= 1, info
    assert _numbers(out) == list(range(1, count + 1)), out
    assert "SIGUSR1: saving at" in out
    assert "checkpointed before its time limit; requeueing" in out


REAL_BUNDLE = os.environ.get("VMBUILD_SLURM_BUNDLE")  # a runner bundle to use instead


@pytest.fixture
def real_image(request: pytest.FixtureRequest) -> Path:
    """The counter image: $VMBUILD_SLURM_IMAGE, else the session's build of examples/counter."""
    given = os.environ.get("VMBUILD_SLURM_IMAGE")
    if given:
        return Path(given)
    return Path(request.getfixturevalue("counter_vmx"))


def _submit_counter(cluster: SlurmCluster, image: Path, tmp_path: Path, count: int,
                    time_limit: str | None = None) -> tuple[int, str]:
    """sbatch the generated script for the counter image with the real runner bundle;
    return (job id, script name)."""
    options = SubmitOptions(work_root=str(tmp_path / "work"), keep_work=True,
                            time_limit=time_limit, runner_args=("--env", f"COUNT={count}"),
                            bundle=REAL_BUNDLE or "vmbuild-run.pyz")
    files = write_submission(image, "slurm", tmp_path / "submit", options,
                             bundle=REAL_BUNDLE is None)
    if REAL_BUNDLE is None:  # write_submission always writes the bundle: no silent skip
        assert files[1:] == [tmp_path / "submit" / "vmbuild-run.pyz"], files
    return cluster.sbatch(files[0]), files[0].stem


def test_real_runner_requeue_resumes(slurm_cluster: SlurmCluster, real_image: Path,
                                     tmp_path: Path) -> None:
    """The real runner bundle and VM under the generated script: `scontrol requeue` while the
    counter image counts; the VM is suspended within KillWait (the runner exits 85), the job
    requeued and resumed (no second boot), and the outputs hold 1..COUNT once."""
    count = int(os.environ.get("VMBUILD_SLURM_COUNT", "40"))
    slurm_cluster.set_kill_wait(int(os.environ.get("VMBUILD_SLURM_KILLWAIT", "120")))
    job, name = _submit_counter(slurm_cluster, real_image, tmp_path, count)
    out = tmp_path / "submit" / f"{name}-{job}.out"
    control = tmp_path / "work" / str(job) / CONTROL_LOG
    deadline = time.monotonic() + 600  # a TCG boot takes about 30 s
    while not (control.exists() and '"started"' in control.read_text()):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.5)
    time.sleep(float(os.environ.get("VMBUILD_SLURM_REQUEUE_AFTER", "8")))  # mid-count
    slurm_cluster.run("scontrol", "requeue", str(job))
    info = slurm_cluster.wait_for(job, DONE, timeout=1200)
    text = out.read_text()
    print(text)
    assert info["JobState"] == "COMPLETED", (info, text)
    assert int(info["Restarts"]) >= 1, info
    assert f"job {job} checkpointed in" in text, text  # the runner exited 85 on SIGTERM
    assert "resuming from" in text, text
    boots = parse_control(control.read_text()).boot_ids
    assert len(boots) == 1, f"the VM booted again instead of resuming: {boots}\n{text}"
    outputs = tmp_path / "submit" / f"{name}-outputs.{job}"
    assert _numbers((outputs / "count.txt").read_text()) == list(range(1, count + 1))
    assert len((outputs / "boots.txt").read_text().split()) == 1  # never rebooted


def test_real_runner_time_limit_resumes(slurm_cluster: SlurmCluster, real_image: Path,
                                        tmp_path: Path) -> None:
    """The real runner under a 2-minute time limit and a short KillWait: USR1 comes the
    estimated suspend time ahead of the limit, the runner suspends, the script requeues, and
    the count finishes over several allocations from one boot."""
    count = int(os.environ.get("VMBUILD_SLURM_LONG_COUNT", "150"))
    slurm_cluster.set_kill_wait(2)
    job, name = _submit_counter(slurm_cluster, real_image, tmp_path, count, time_limit="2")
    info = slurm_cluster.wait_for(job, DONE, timeout=1800)
    text = (tmp_path / "submit" / f"{name}-{job}.out").read_text()
    print(text)
    assert info["JobState"] == "COMPLETED", (info, text)
    assert int(info["Restarts"]) >= 1, info
    assert "checkpointed before its time limit; requeueing" in text, text
    boots = parse_control((tmp_path / "work" / str(job) / CONTROL_LOG).read_text()).boot_ids
    assert len(boots) == 1, f"the VM booted again instead of resuming: {boots}\n{text}"
    outputs = tmp_path / "submit" / f"{name}-outputs.{job}"
    assert _numbers((outputs / "count.txt").read_text()) == list(range(1, count + 1))
