"""End-to-end tests of ``vmbuild run`` with the QEMU backend, on images built by vmbuild.

Every test here boots real VMs under QEMU (about 25 s a boot under TCG), so the number of
fresh boots is kept deliberate: hello once; the counter once for the checkpoint cycles (three
resumes, no reboot) and once or twice for the SIGKILL test.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbuild.runner.bundle import write_bundle

from .runner_harness import Runner, processes_mentioning, settled_count, wait_gone

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]


def control_events(workdir: Path) -> list[dict[str, object]]:
    events = []
    for line in (workdir / "control.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_hello_runs_the_job_with_inputs_and_outputs(hello_vmx: Path, tmp_path: Path) -> None:
    """Through the zipapp, with a plain isolated python3 (as on an execute node)."""
    bundle = tmp_path / "vmbuild-run.pyz"
    write_bundle(bundle)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    data = tmp_path / "data.txt"
    data.write_text("some input\n")
    out = tmp_path / "out"
    runner = Runner(hello_vmx, "--workdir", tmp_path / "work", "--output-dir", out,
                    "--input", data, "--arg", "first", "--env", "GREETING=bonjour",
                    program=[python, "-I", str(bundle)], cwd=tmp_path,
                    env={"PYTHONPATH": ""})
    rc = runner.wait()
    assert rc == 0, runner.describe()
    text = "\n".join(t for _w, t in runner.lines)
    assert "bonjour from the guest" in text
    assert "'first'" in text
    assert (out / "result.txt").read_text() == "bonjour first\n"
    # finished: nothing left to resume, the layers are gone, the converted base is kept
    work = tmp_path / "work"
    assert not (work / "checkpoint.json").exists()
    assert json.loads((work / "result.json").read_text())["status"] == 0
    assert not list(work.glob("*.mig")) and not list(work.glob("*-layer-*.qcow2"))
    assert processes_mentioning(str(work)) == []


def test_checkpoint_resume_cycles(counter_vmx: Path, tmp_path: Path) -> None:
    """Three checkpoint/resume cycles (one after moving the work directory, one by SIGTERM),
    a pause/unpause, then the job ends with its own status (3)."""
    count = 24
    work = tmp_path / "work"
    out = tmp_path / "out"
    seen: list[int] = []

    first = Runner(counter_vmx, "--workdir", work, "--output-dir", out,
                   "--env", f"COUNT={count}", "--env", "EXIT_STATUS=3")
    first.wait_number(4)
    first.signal(signal.SIGUSR1)
    # the checkpoint's duration is measured in bench/, not bounded here (TCG on a busy
    # machine varies widely): the run must end in a checkpoint, within a generous bound
    assert first.wait(300) == 85, first.describe()
    assert (work / "checkpoint.json").is_file()
    assert not list(work.glob("base-*.qcow2")), "the image's own disk must not travel"
    assert wait_gone(str(work)) == []
    seen += first.numbers

    # second run: SIGTSTP pauses (no numbers for a while), SIGCONT continues; SIGTERM saves
    second = Runner(counter_vmx, "--workdir", work, "--output-dir", out)
    second.wait_number(seen[-1] + 2)
    second.signal(signal.SIGTSTP)
    second.wait_err("VM paused", timeout=120)  # the runner confirms the pause
    before = settled_count(second)  # numbers in flight when the pause came have arrived
    time.sleep(3)  # a window in which a running VM would print (one number a second)
    assert len(second.numbers) == before, "the VM kept running while paused"
    second.signal(signal.SIGCONT)
    second.wait_number(max(second.numbers) + 2)
    second.signal(signal.SIGTERM)
    assert second.wait(300) == 85, second.describe()
    seen += second.numbers

    # third run, after moving the work directory elsewhere, with the image copied too (as a
    # scheduler brings both into a new sandbox: new paths, new mtimes)
    moved = tmp_path / "elsewhere" / "work-moved"
    moved.parent.mkdir()
    shutil.move(str(work), moved)
    image_copy = tmp_path / "elsewhere" / "image"
    shutil.copytree(counter_vmx.parent, image_copy)
    third = Runner(image_copy / counter_vmx.name, "--workdir", moved, "--output-dir", out)
    third.wait_number(seen[-1] + 2)
    third.signal(signal.SIGUSR1)
    assert third.wait(300) == 85, third.describe()
    seen += third.numbers

    last = Runner(counter_vmx, "--workdir", moved, "--output-dir", out)
    assert last.wait() == 3, last.describe()
    seen += last.numbers

    assert seen == list(range(1, count + 1)), "stdout across the runs is one count"
    assert (out / "count.txt").read_text().split() == [str(n) for n in range(1, count + 1)]
    assert len((out / "boots.txt").read_text().split()) == 1, "the guest rebooted"
    boot_ids = {e.get("boot_id") for e in control_events(moved) if e["event"] == "started"}
    assert len(boot_ids) == 1
    assert not (moved / "checkpoint.json").exists()


def test_sigkill_at_random_moments(counter_vmx: Path, tmp_path: Path) -> None:
    """SIGKILL during the run, during periodic saves, while resuming: the outputs always end
    with each number once, from one boot, and no QEMU outlives its runner."""
    count = 30
    work = tmp_path / "work"
    out = tmp_path / "out"
    seed = int(time.time())
    rng = random.Random(seed)
    kills: list[tuple[str, float]] = []
    # what the runner is doing when the SIGKILL comes, cycle by cycle
    moments = ["running", "saving", "resuming", "saving", "running"]
    for cycle, moment in enumerate(moments):
        # --env only matters on a fresh start (a resumed VM keeps its job's environment),
        # and a kill before the first checkpoint means a fresh start.
        runner = Runner(counter_vmx, "--workdir", work, "--output-dir", out,
                        "--checkpoint-every", "4s", "--env", f"COUNT={count}")
        if moment == "resuming":
            delay = rng.uniform(0.5, 4.0)
            time.sleep(delay)
        elif moment == "saving":
            runner.wait_err("saving checkpoint")
            delay = rng.uniform(0.0, 0.6)  # a save takes about half a second here
            time.sleep(delay)
        else:
            runner.wait_output()
            delay = rng.uniform(1.0, 6.0)
            time.sleep(delay)
        if runner.proc.poll() is not None:
            break
        runner.signal(signal.SIGKILL)
        runner.wait(60)
        kills.append((moment, round(delay, 2)))
        assert wait_gone(str(work)) == [], f"a VM outlived its runner (cycle {cycle})"
    note = f"seed {seed}, kills {kills}"
    final = Runner(counter_vmx, "--workdir", work, "--output-dir", out, "--env", f"COUNT={count}")
    assert final.wait() == 0, final.describe() + "\n" + note
    numbers = (out / "count.txt").read_text().split()
    assert numbers == [str(n) for n in range(1, count + 1)], note
    assert len((out / "boots.txt").read_text().split()) == 1, note
    assert len(kills) == len(moments), note


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")
def test_transport_form_checkpoint_and_resume(counter_vmx: Path, tmp_path: Path) -> None:
    """The image as a scheduler ships it (.vmx + .vmdk.zst, no .vmdk): the runner expands
    the disk, converts it, runs the job, checkpoints; the work directory it leaves holds
    neither the expansion nor the base; the resume expands again and finds its base by the
    same key; the job completes from one boot."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    shutil.copy(counter_vmx, sandbox)
    shipped = counter_vmx.with_suffix(".vmdk.zst")
    if shipped.is_file():
        shutil.copy(shipped, sandbox)
    else:  # an image built before the transport form
        subprocess.run(["zstd", "-q", "-9", "--long=27", "-o", str(sandbox / shipped.name),
                        str(counter_vmx.with_suffix(".vmdk"))], check=True)
    vmx = sandbox / counter_vmx.name
    work, out = tmp_path / "work", tmp_path / "out"
    first = Runner(vmx, "--workdir", work, "--output-dir", out, "--env", "COUNT=10")
    first.wait_number(3)
    first.signal(signal.SIGUSR1)
    assert first.wait(300) == 85, first.describe()
    assert any("expanded counter.vmdk.zst (" in line for line in first.err), first.describe()
    assert not list(work.glob("expanded-*")) and not list(work.glob("base-*.qcow2"))
    last = Runner(vmx, "--workdir", work, "--output-dir", out)
    assert last.wait() == 0, last.describe()
    assert (out / "count.txt").read_text().split() == [str(n) for n in range(1, 11)]
    assert len((out / "boots.txt").read_text().split()) == 1
    result = json.loads((work / "result.json").read_text())
    assert [e["reused"] for e in result["expansions"]] == [False, False]
    assert sorted(p.name for p in sandbox.iterdir()) == sorted([vmx.name, shipped.name])
