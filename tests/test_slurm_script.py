"""The generated sbatch script: shell syntax (bash -n), #SBATCH lines, quoting, and the
signal-forwarding / requeue logic run under bash with a fake runner (no Slurm needed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scheduler_images import make_image
from vmbuild.schedulers import SchedulerError, SubmitOptions, render_sbatch, write_submission
from vmbuild.schedulers.slurm import slurm_time_seconds

FAKE = Path(__file__).with_name("fake_runner.py")


def _sbatch_options(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if match := re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?$", line):
            found[match.group(1)] = match.group(2) or ""
    return found


def _bash_n(text: str, tmp: Path) -> None:
    script = tmp / "check.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "image", memory_mib=4096, cpus=2)


@pytest.mark.parametrize("options", [
    SubmitOptions(),
    SubmitOptions(time_limit="2-00:00:00", partition="long", account="proj",
                  backend="qemu", checkpoint_every="30m", extra=("qos=normal", "--exclusive")),
    SubmitOptions(signal_lead=False, keep_work=True, work_root="/scratch/$USER odd",
                  output_dir="/data/it's here"),
], ids=["default", "all-options", "no-lead"])
def test_script_parses_and_has_sbatch_lines(image: Path, tmp_path: Path,
                                            options: SubmitOptions) -> None:
    text = render_sbatch(image, options, script_dir=tmp_path / "sub dir")
    _bash_n(text, tmp_path)
    assert text.startswith("#!/bin/bash\n")
    opts = _sbatch_options(text)
    assert "requeue" in opts
    assert opts["open-mode"] == "append"
    assert opts["mem"] == f"{4096 + options.memory_overhead_mib}M"
    assert opts["cpus-per-task"] == "2"
    assert opts["job-name"] == "hello"
    assert shlex.split(opts["output"]) == [str(tmp_path / "sub dir" / "hello-%j.out")]
    if options.signal_lead:
        assert opts["signal"] == f"B:USR1@{options.estimate(4096).seconds}"
    else:
        assert "signal" not in opts
    if options.time_limit:
        assert opts["time"] == options.time_limit
        assert opts["partition"] == "long" and opts["account"] == "proj"
        assert "qos" in opts and "exclusive" in opts
        assert "--backend qemu" in text and "--checkpoint-every 30m" in text
    else:
        assert "time" not in opts
    # All #SBATCH lines come before the first command, or sbatch ignores them.
    first_command = next(i for i, line in enumerate(text.splitlines())
                         if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines())
               if line.startswith("#SBATCH"))
    assert "wait \"$runner_pid\"" in text and "trap 'forward USR1' USR1" in text
    assert 'scontrol requeue "$job_id"' in text
    if options.work_root:
        assert shlex.quote(options.work_root) in text
    else:
        assert "${VMBUILD_WORK_ROOT:-$HOME/.vmbuild-work}" in text


def test_lead_grows_with_memory_and_fits_time_limit(tmp_path: Path) -> None:
    leads = []
    for memory in (1024, 16384, 65536):
        vmx = make_image(tmp_path / str(memory), memory_mib=memory)
        text = render_sbatch(vmx, SubmitOptions(), script_dir=tmp_path)
        leads.append(int(_sbatch_options(text)["signal"].split("@")[1]))
    assert leads == sorted(leads) and len(set(leads)) == 3
    vmx = make_image(tmp_path / "big", memory_mib=65536)
    with pytest.raises(SchedulerError, match="time limit"):
        render_sbatch(vmx, SubmitOptions(time_limit="10"), script_dir=tmp_path)


def test_slurm_time_formats() -> None:
    assert slurm_time_seconds("90") == 5400
    assert slurm_time_seconds("10:30") == 630
    assert slurm_time_seconds("1:00:00") == 3600
    assert slurm_time_seconds("2-0") == 2 * 86400
    assert slurm_time_seconds("1-2:03") == 86400 + 7200 + 180
    assert slurm_time_seconds("1-2:03:04") == 86400 + 7200 + 184
    with pytest.raises(SchedulerError):
        slurm_time_seconds("soon")


def test_write_submission_slurm(image: Path, tmp_path: Path) -> None:
    files = write_submission(image, "slurm", tmp_path / "out")
    assert files[0] == tmp_path / "out" / "hello.sbatch"
    assert os.access(files[0], os.X_OK)
    text = files[0].read_text()
    bundle = tmp_path / "out" / "vmbuild-run.pyz"
    assert f"python3 {bundle} run {image}" in text
    if len(files) == 2:
        assert files[1] == bundle


def _run_script(tmp: Path, image: Path, *, send: signal.Signals | None,
                count: int = 20) -> tuple[int, str, Path]:
    """Run the generated script under bash as if sbatch had started it (fake SLURM_JOB_ID,
    a stub `scontrol` on PATH that records its arguments)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(tmp / "scontrol.log"))}\n')
    stub.chmod(0o755)
    options = SubmitOptions(
        runner_command=[sys.executable, str(FAKE), "--count", str(count), "--interval", "0.1",
                        "--save-seconds", "0.5"], work_root=str(tmp / "work"))
    script = tmp / "job.sbatch"
    script.write_text(render_sbatch(image, options, script_dir=tmp))
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if send is not None:
        time.sleep(1.0)
        proc.send_signal(send)  # only the batch shell, as --signal=B: does
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, tmp / "work" / "4242"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_usr1_to_the_shell_checkpoints_and_requeues(image: Path, tmp_path: Path) -> None:
    status, out, work = _run_script(tmp_path, image, send=signal.SIGUSR1)
    assert status == 85, out
    assert "SIGUSR1: saving at" in out and "checkpoint published" in out
    assert (work / "checkpoint.json").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    # The requeued job (same id) resumes from the work directory and finishes.
    status, out2, work = _run_script(tmp_path, image, send=None)
    assert status == 0, out2
    assert "resuming from" in out2 and "fake-runner: resumed at" in out2
    numbers = [int(line) for line in (out + out2).splitlines() if line.isdigit()]
    assert numbers == list(range(1, 21))  # nothing lost, nothing repeated
    assert not work.exists()  # removed after the job finished


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_term_checkpoints_without_self_requeue(image: Path, tmp_path: Path) -> None:
    status, out, work = _run_script(tmp_path, image, send=signal.SIGTERM)
    assert status == 85, out
    assert (work / "checkpoint.json").exists()
    assert not (tmp_path / "scontrol.log").exists()  # Slurm requeues preempted jobs itself
    assert "(signal: TERM)" in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_exit_status_passes_through(image: Path, tmp_path: Path) -> None:
    status, out, _ = _run_script(tmp_path, image, send=None, count=3)
    assert status == 0, out
    assert not (tmp_path / "scontrol.log").exists()
