"""vmbuild's HTCondor submit files on a real HTCondor 25.0 pool (tests/condor_pool.py), with
the real runner bundle and the real counter image where a VM is the point.

The seed paper's one failure was HTCondor killing the wrapper before the VM's suspend had
finished. These tests keep true what was first seen by hand on such a pool: an evicted VM job
is checkpointed, its checkpoint travels back to the submit side and into the next sandbox,
and the same boot resumes; a self-checkpointing job (``checkpoint_exit_code``) restarts from
each checkpoint; ``condor_rm`` leaves no VM behind; a vacate time shorter than the suspend
loses the state (and the generated one does not); the probe's attributes reach the machine ad;
the runner's Chirp reports reach the job ad; ``vmbuild submit --now`` and ``--item`` work
through the real ``condor_submit``.

Scenarios share VM boots where they can (the whole module is a few minutes under TCG); each
test prints its timings and the bytes HTCondor moved, for the notes (run with ``-s``).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.condor_pool import CondorPool, chown_tree, condor_pool
from tests.runner_harness import processes_mentioning
from tests.scheduler_images import make_image
from vmbuild.runner.contract import CONTROL_LOG, parse_control
from vmbuild.schedulers import SubmitOptions, write_submission

__all__ = ["condor_pool"]

pytestmark = pytest.mark.slow
FAKE = Path(__file__).with_name("fake_runner.py")
VM_TIMEOUT = 900.0  # bound for a VM job's whole life on a busy 2-core TCG machine
STARTED = re.compile(r"counter: counting to (\d+), boot (\S+)")


def _numbers(text: str) -> list[int]:
    return [int(line) for line in text.splitlines() if re.fullmatch(r"\d+", line.strip())]


def _note(what: str, **values: object) -> None:
    """A line for the notes: what happened, how long it took, what moved."""
    print(f"[condor-pool] {what}: " + ", ".join(f"{k}={v}" for k, v in values.items()),
          flush=True)


@pytest.fixture(scope="module")
def pool_image(condor_pool: CondorPool, request: pytest.FixtureRequest) -> Path:
    """The counter image, copied where the pool user (who runs condor_submit) may read it."""
    source = Path(request.getfixturevalue("counter_vmx"))
    target = condor_pool.root / "image"
    if not target.exists():
        shutil.copytree(source.parent, target)
        chown_tree(target, condor_pool.user)
    return target / source.name


def _write(pool: CondorPool, name: str, image: Path, options: SubmitOptions,
           bundle: bool = True) -> Path:
    out = pool.mkdir(name)
    files = write_submission(image, "condor", out, options, bundle=bundle)
    chown_tree(out, pool.user)
    return files[0]


def _sandbox_stdout(pool: CondorPool) -> list[Path]:
    return sorted((pool.local / "execute").glob("dir_*/_condor_stdout"))


def _live_numbers(pool: CondorPool) -> list[int]:
    found: list[int] = []
    for path in _sandbox_stdout(pool):
        try:
            found += _numbers(path.read_text(errors="replace"))
        except OSError:
            continue
    return found


def _qemu_pids(under: Path) -> list[int]:
    """QEMU processes whose command line names a path under ``under``."""
    pids = []
    for pid in processes_mentioning(str(under)):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if b"qemu-system" in argv0:
            pids.append(pid)
    return pids


def _transfer_lines(log: Path) -> list[str]:
    """The user log's byte counts (per run and in total), for the notes."""
    return [line.strip() for line in log.read_text(errors="replace").splitlines()
            if "Bytes Sent By Job" in line or "Bytes Received By Job" in line]


def _history(pool: CondorPool, cluster: int, *attrs: str) -> dict[str, str]:
    rows = pool.history(cluster, *attrs)
    assert len(rows) == 1, rows
    return dict(zip(attrs, rows[0], strict=True))


# --------------------------------------------------------------------------- no VM needed


def test_probe_in_machine_ad_and_unmatchable_job_stays_idle(condor_pool: CondorPool) -> None:
    """The probe, installed from `vmbuild probe --condor-config`, puts its attributes into the
    machine ad; a generated job that asks for a runner version no node has never runs: the
    negotiator considers it and leaves it idle."""
    row = condor_pool.machine("VMBUILD_QEMU", "VMBUILD_KVM", "VMBUILD_VMWARE",
                              "VMBUILD_RUNNER_VERSION", "VMBUILD_QEMU_VERSION")
    _note("machine ad", **dict(zip(("VMBUILD_QEMU", "VMBUILD_KVM", "VMBUILD_VMWARE",
                                    "VMBUILD_RUNNER_VERSION", "VMBUILD_QEMU_VERSION"), row,
                                   strict=False)))
    assert row[0] == "true" and row[2] == "false" and row[3] == "0.1.0", row
    image = make_image(condor_pool.mkdir("unmatchable-image"), memory_mib=256)
    chown_tree(image.parent, condor_pool.user)
    submit = _write(condor_pool, "unmatchable", image,
                    SubmitOptions(min_probe_version="99.0", request_memory_mib=200),
                    bundle=True)
    cluster = condor_pool.submit(submit)
    try:
        # the schedd records a failed negotiation in the job ad: an event, not a timer
        condor_pool.wait_for("a negotiation cycle that rejects the job",
                             lambda: (condor_pool.q(cluster, "LastRejMatchReason") or [[""]])
                             [0][0] not in ("", "undefined"), timeout=120)
        status, reason, starts = condor_pool.q(cluster, "JobStatus", "LastRejMatchReason",
                                               "NumJobStarts")[0]
        _note("unmatchable job", status=status, reason=reason)
        assert status == "1", (status, reason)  # idle
        assert starts in ("0", "undefined")
    finally:
        condor_pool.run("condor_rm", str(cluster))


def _fake_submit(pool: CondorPool, name: str, extra: tuple[str, ...],
                 runner: tuple[str, ...] = ()) -> Path:
    """A generated submit file whose executable is tests/fake_runner.py (save takes 6 s)."""
    image = make_image(pool.mkdir(f"{name}-image"), memory_mib=256)
    chown_tree(image.parent, pool.user)
    options = SubmitOptions(bundle="fake_runner.py", request_memory_mib=200, extra=extra,
                            runner_args=("--count", "200", "--interval", "0.25",
                                         "--save-seconds", "6", *runner))
    submit = _write(pool, name, image, options, bundle=False)
    executable = submit.parent / "fake_runner.py"
    shutil.copy(FAKE, executable)
    executable.chmod(0o755)
    chown_tree(submit.parent, pool.user)
    return submit


def _vacate_past_20(pool: CondorPool, submits: dict[str, Path],
                    *attrs: str) -> dict[str, tuple[dict[str, str], str]]:
    """Submit each fake job, vacate all once each counts past 20 (one slot each), wait for
    them to finish; per label: the history attributes asked for and the job's stdout (every
    run's, appended by HTCondor in order)."""
    clusters = {label: pool.submit(submit) for label, submit in submits.items()}
    pool.wait_for("every fake job counting past 20", lambda: len(
        [p for p in _sandbox_stdout(pool)
         if max(_numbers(p.read_text(errors="replace")) or [0]) >= 20]) >= len(clusters),
        timeout=300)
    for cluster in clusters.values():
        pool.run("condor_vacate_job", f"{cluster}.0")
    outcome = {}
    for label, cluster in clusters.items():
        pool.wait_done(cluster, timeout=600)
        info = _history(pool, cluster, "ExitCode", "JobStatus", *attrs)
        outcome[label] = (info, (submits[label].parent / f"hello.{cluster}.0.out").read_text())
    return outcome


def test_seed_failure_short_vacate_loses_state_generated_file_keeps_it(
        condor_pool: CondorPool) -> None:
    """The paper's failure, reproduced and prevented. Two jobs with a runner whose save takes
    6 s are vacated mid-count: one with ``job_max_vacate_time = 2`` (the hard kill lands in
    the middle of the save: nothing is published, the job starts again from zero), one with
    the generated vacate time (the save completes, the checkpoint travels, it resumes)."""
    short = _fake_submit(condor_pool, "seed-short", ("job_max_vacate_time = 2",))
    kept = _fake_submit(condor_pool, "seed-generated", ())
    generated = re.search(r"^job_max_vacate_time\s*=\s*(\d+)", kept.read_text(), re.M)
    assert generated and int(generated.group(1)) > 6  # longer than the 6 s save
    began = time.monotonic()
    outcome = _vacate_past_20(condor_pool, {"short": short, "generated": kept}, "NumJobStarts")
    for label, (info, out) in outcome.items():
        _note(f"seed failure, {label} vacate time", exit=info["ExitCode"],
              starts=info["NumJobStarts"],
              first_line_of_last_run=out.splitlines()[0] if out else "")
    _note("seed failure: both jobs", seconds=round(time.monotonic() - began))
    short_info, short_out = outcome["short"]
    kept_info, kept_out = outcome["generated"]
    for info in (short_info, kept_info):
        assert info["ExitCode"] == "0" and info["JobStatus"] == "4", info
        assert int(info["NumJobStarts"]) >= 2, info
    # HTCondor appends each run's stdout to the same output file: the runs in order
    short_runs = re.findall(r"fake-runner: (fresh start|resumed at \d+)", short_out)
    kept_runs = re.findall(r"fake-runner: (fresh start|resumed at \d+)", kept_out)
    _note("seed failure: runs", short=short_runs, generated=kept_runs)
    # cut short: nothing published, the next run counted again from the start
    # (the killed run's own stdout does not come back: a hard-killed job transfers nothing,
    # so the spool keeps what it had, here nothing, and never a torn save)
    assert short_runs and set(short_runs) == {"fresh start"}, short_runs
    assert "checkpoint published" not in short_out
    last_run = short_out.rsplit("fake-runner: fresh start", 1)[1]
    assert _numbers(last_run) == list(range(1, 201)), last_run[-2000:]
    # the generated vacate time: the save finished, the next run resumed where it stopped
    assert kept_runs[0] == "fresh start" and kept_runs[1].startswith("resumed at"), kept_runs
    assert int(kept_runs[1].split()[-1]) > 20
    assert _numbers(kept_out) == list(range(1, 201)), kept_out[-2000:]


def _runs(out: str) -> list[str]:
    """Each run's start, in order (HTCondor appends every run's stdout it gets back)."""
    return re.findall(r"fake-runner: (fresh start|resumed at \d+)", out)


def test_self_checkpoint_then_eviction_keeps_the_newest_whole_state(
        condor_pool: CondorPool) -> None:
    """``when_to_transfer_output = ON_EXIT_OR_EVICT`` together with ``checkpoint_exit_code``
    on 25.0. Two jobs checkpoint themselves at 10 (exit 85: the checkpoint goes to the spool
    and the job restarts), then are vacated past 20. With a 2 s vacate time the hard kill
    lands mid-save: nothing is transferred, the spool keeps the self-checkpoint, the job
    resumes at 10 (never from a torn save, never from zero). With the generated vacate time
    the eviction-time transfer brings the newer state, and the job resumes past 20."""
    runner = ("--checkpoint-at", "10")
    short = _fake_submit(condor_pool, "combo-short", ("job_max_vacate_time = 2",), runner)
    kept = _fake_submit(condor_pool, "combo-generated", (), runner)
    began = time.monotonic()
    runs = {}
    for label, (info, out) in _vacate_past_20(
            condor_pool, {"short": short, "generated": kept}).items():
        runs[label] = _runs(out)
        assert info["ExitCode"] == "0" and info["JobStatus"] == "4", (info, out[-2000:])
        last_start = int(runs[label][-1].split()[-1])
        last_run = out[out.rfind(f"fake-runner: {runs[label][-1]}"):]
        assert _numbers(last_run) == list(range(last_start, 201)), last_run[-1000:]
    _note("self-checkpoint then eviction", seconds=round(time.monotonic() - began),
          short_runs=runs["short"], generated_runs=runs["generated"])
    assert runs["short"][-1] == "resumed at 10", runs
    assert "fresh start" not in runs["short"][1:], runs
    assert runs["generated"][-1].startswith("resumed at"), runs
    assert int(runs["generated"][-1].split()[-1]) > 20, runs


# --------------------------------------------------------------------------- real VMs


def test_counter_evicted_checkpoint_travels_and_resumes(condor_pool: CondorPool,
                                                        pool_image: Path) -> None:
    """Completion and eviction with the real runner and VM: condor_vacate_job mid-count, the
    runner suspends the VM within the vacate time, the job directory (checkpoint) goes to the
    schedd's spool and into the next sandbox, the same boot resumes, and 1..N arrive exactly
    once; stdout, outputs, ExitCode and condor_history come back. While it runs, the runner's
    Chirp reports (every 3 s here) are in the job ad."""
    count = 40
    submit = _write(condor_pool, "evict", pool_image,
                    SubmitOptions(job_env=(f"COUNT={count}",), chirp_interval="3s"))
    began = time.monotonic()
    cluster = condor_pool.submit(submit)
    condor_pool.wait_for("the counter's first numbers", lambda: len(_live_numbers(condor_pool))
                         >= 1, timeout=VM_TIMEOUT)
    first_number = time.monotonic() - began
    text = "".join(p.read_text(errors="replace") for p in _sandbox_stdout(condor_pool))
    boot_before = STARTED.search(text)
    assert boot_before, text
    chirp: dict[str, str] = {}
    names = ("VmbuildGuestCpuSeconds", "VmbuildGuestCpuUsage", "VmbuildGuestResidentMiB",
             "VmbuildGuestMemoryMiB", "VmbuildGuestUpdated")

    def reported() -> bool:
        rows = condor_pool.q(cluster, *names)
        if rows and rows[0][0] not in ("undefined", ""):
            chirp.update(zip(names, rows[0], strict=True))
            return True
        return False

    condor_pool.wait_for("VmbuildGuest* attributes in condor_q", reported, timeout=120)
    _note("chirp attributes in condor_q", **chirp)
    assert float(chirp["VmbuildGuestCpuSeconds"]) > 0
    assert float(chirp["VmbuildGuestResidentMiB"]) > 0
    condor_pool.wait_for("the count past 10", lambda: max(_live_numbers(condor_pool) or [0])
                         >= 10, timeout=300)
    vacated_at = max(_live_numbers(condor_pool))
    condor_pool.run("condor_vacate_job", f"{cluster}.0")
    condor_pool.wait_done(cluster, timeout=VM_TIMEOUT)
    total = time.monotonic() - began

    info = _history(condor_pool, cluster, "ExitCode", "NumJobStarts", "JobStatus",
                    "BytesSent", "BytesRecvd", "TransferInputSizeMB")
    jobdir = submit.parent / f"vmbuild.{cluster}.0"
    out = (submit.parent / f"counter.{cluster}.0.out").read_text()
    err = (submit.parent / f"counter.{cluster}.0.err").read_text()
    log = submit.parent / f"counter.{cluster}.log"
    for line in _transfer_lines(log):
        _note("user log", line=line)
    _note("eviction", vacated_at=vacated_at, first_number_s=round(first_number),
          total_s=round(total), starts=info["NumJobStarts"], exit=info["ExitCode"],
          bytes_from_job=info["BytesSent"], bytes_to_job=info["BytesRecvd"],
          input_mb=info["TransferInputSizeMB"])
    assert info["JobStatus"] == "4" and info["ExitCode"] == "0", (info, err[-3000:])
    assert int(info["NumJobStarts"]) == 2, info
    assert "Job was evicted" in log.read_text()
    assert "checkpointed in" in err or "checkpoint" in err, err[-3000:]
    assert "resuming" in err, err[-3000:]
    counted = _numbers((jobdir / "outputs" / "count.txt").read_text())
    assert counted == list(range(1, count + 1)), counted  # nothing lost, nothing repeated
    boots = (jobdir / "outputs" / "boots.txt").read_text().split()
    assert boots == [boot_before.group(2)], boots  # the same boot before and after
    control = parse_control((jobdir / "work" / CONTROL_LOG).read_text())
    assert control.boot_ids == [boot_before.group(2)], control.boot_ids
    assert _numbers(out) and _numbers(out)[-1] == count, out[-500:]


def test_periodic_self_checkpoints_restart_from_each(condor_pool: CondorPool,
                                                     pool_image: Path) -> None:
    """``--checkpoint-every`` with ``--exit-after-checkpoint``: the runner exits 85 after
    each checkpoint, HTCondor keeps the checkpoint files (``checkpoint_exit_code``) and
    starts it again at once; the count finishes from one boot."""
    count = 30
    submit = _write(condor_pool, "periodic", pool_image,
                    SubmitOptions(job_env=(f"COUNT={count}",), checkpoint_every="12s"))
    began = time.monotonic()
    cluster = condor_pool.submit(submit)
    spooled: list[int] = [0]

    def watch_spool() -> None:
        spooled[0] = max(spooled[0], condor_pool.spool_bytes(cluster))

    condor_pool.wait_done(cluster, timeout=VM_TIMEOUT, on_poll=watch_spool)
    info = _history(condor_pool, cluster, "ExitCode", "NumJobStarts", "JobStatus",
                    "BytesSent", "BytesRecvd", "NumShadowStarts")
    jobdir = submit.parent / f"vmbuild.{cluster}.0"
    err = (submit.parent / f"counter.{cluster}.0.err").read_text()
    log = (submit.parent / f"counter.{cluster}.log").read_text()
    exits = err.count("periodic checkpoint published; exiting")
    resumes = err.count("resuming from checkpoint")
    for line in log.splitlines():
        if "heckpoint" in line or "Bytes" in line:
            _note("user log", line=line.strip())
    _note("periodic self-checkpoint", total_s=round(time.monotonic() - began),
          starts=info["NumJobStarts"], checkpoint_exits=exits, resumes=resumes,
          largest_spooled_checkpoint=spooled[0],
          exit=info["ExitCode"], bytes_from_job=info["BytesSent"],
          bytes_to_job=info["BytesRecvd"])
    assert info["JobStatus"] == "4" and info["ExitCode"] == "0", (info, err[-3000:])
    # HTCondor restarts a job that exits with checkpoint_exit_code in the same sandbox, by
    # the same starter (NumJobStarts stays 1): the runner's own log counts the restarts
    assert exits >= 1 and resumes == exits, err[-3000:]
    assert spooled[0] > 1 << 20, spooled  # the checkpoint (the VM's memory) reached the schedd
    counted = _numbers((jobdir / "outputs" / "count.txt").read_text())
    assert counted == list(range(1, count + 1)), counted
    assert len((jobdir / "outputs" / "boots.txt").read_text().split()) == 1
    assert len(parse_control((jobdir / "work" / CONTROL_LOG).read_text()).boot_ids) == 1


def test_condor_rm_mid_run_leaves_no_vm(condor_pool: CondorPool, pool_image: Path) -> None:
    """condor_rm while the VM counts: the QEMU process ends and the sandbox (the VM's disk
    layers and any state) is gone from the execute side."""
    submit = _write(condor_pool, "rm", pool_image, SubmitOptions(job_env=("COUNT=600",)))
    cluster = condor_pool.submit(submit)
    execute = condor_pool.local / "execute"
    condor_pool.wait_for("the counter's first numbers", lambda: len(_live_numbers(condor_pool))
                         >= 1, timeout=VM_TIMEOUT)
    qemu = _qemu_pids(execute)
    assert qemu, "no QEMU process found under the execute directory"
    condor_pool.run("condor_rm", str(cluster))
    condor_pool.wait_for("the job gone, its QEMU and its sandbox too", lambda: (
        not condor_pool.q(cluster, "JobStatus") and not _qemu_pids(execute)
        and not list(execute.glob("dir_*"))), timeout=180)
    assert not (condor_pool.local / "spool" / str(cluster)).exists()
    _note("condor_rm", qemu_pids_before=qemu, left_in_execute=sorted(
        p.name for p in execute.iterdir()))


def test_vmbuild_submit_now_queues_one_job_per_item(condor_pool: CondorPool,
                                                    pool_image: Path) -> None:
    """`vmbuild submit --now --item A --item B` as the pool user: the real condor_submit
    queues two jobs; each gets its own item as an input and its own job directory back."""
    out = condor_pool.mkdir("items")
    items = []
    for name in ("case-a.txt", "case-b.txt"):
        item = out / "data" / name
        item.parent.mkdir(exist_ok=True)
        item.write_text(f"{name}\n")
        items.append(item)
    chown_tree(out, condor_pool.user)
    argv = [*condor_pool.vmbuild_argv(), "submit", str(pool_image), "-s", "condor",
            "-o", str(out / "submit"), "--env", "COUNT=3", "--now",
            # one VM at a time on this 2-CPU pool (a later line wins in a submit file)
            "--extra", "request_cpus = 2"]
    for item in items:
        argv += ["--item", str(item)]
    began = time.monotonic()
    proc = condor_pool.run(*argv, cwd=out, timeout=300)
    found = re.search(r"submitted to cluster (\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    cluster = int(found.group(1))
    assert "2 job(s) submitted" in proc.stdout, proc.stdout
    condor_pool.wait_done(cluster, timeout=VM_TIMEOUT)
    rows = condor_pool.history(cluster, "ProcId", "ExitCode", "Arguments", "TransferInput")
    _note("vmbuild submit --now, 2 items", total_s=round(time.monotonic() - began),
          jobs=len(rows))
    assert len(rows) == 2, rows
    for proc_id, exit_code, args, transfer in rows:
        item = items[int(proc_id)]
        assert exit_code == "0", rows
        assert f"--input {item.name}" in args, args
        assert item.name in transfer, transfer
        other = items[1 - int(proc_id)]
        assert other.name not in args and other.name not in transfer, (args, transfer)
        jobdir = out / "submit" / f"vmbuild.{cluster}.{proc_id}"
        assert _numbers((jobdir / "outputs" / "count.txt").read_text()) == [1, 2, 3]
