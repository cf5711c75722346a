#!/usr/bin/env python3
"""Soak the runner's checkpoints: N random hard kills of a counting job, then check that
nothing was torn, lost or repeated (issue 11, item 3).

    .venv/bin/python bench/soak.py --kills 100 [--seed S] [--image counter.vmx]

The counter image (examples/counter) counts 1..COUNT, printing each number and appending it,
fsync'ed, to count.txt on its output disk; each boot appends its boot id to boots.txt. One
fresh boot, one SIGUSR1 checkpoint, then cycles: each cycle starts the runner on the work
directory (it resumes) with periodic checkpoints, and injects one fault:

- ``kill-running`` / ``kill-saving`` / ``kill-resuming``: SIGKILL of the runner soon after it
  reports the job's output, a ``saving checkpoint`` line, or ``resuming from checkpoint``
  (random delays, so kills land before, in and after each step);
- ``kill-qemu``: SIGKILL of QEMU itself while the job runs (the runner must keep the last
  checkpoint and exit 92; the next run resumes it);
- ``storm``: 5-30 SIGUSR1 within a fraction of a second, while resuming or running (one
  checkpoint, exit 85, never a death by SIGUSR1);
- ``disk-full``: the work directory's filesystem is filled to a few MiB, then a checkpoint
  is asked for (by SIGUSR1, or by the periodic timer): the save fails, the previous
  checkpoint is kept and the runner says so; the space comes back before the next cycle.

Where each kill landed is not guessed from the delay: it is read from what the runner had
said on stderr when it died (its last step line), whether a QEMU child existed at the kill,
and which checkpoint the work directory's manifest named afterwards (a kill between the
manifest's rename and the ``published`` line counts as ``saving:published``).

The work directory lives on a small tmpfs (``--fs-mib``) in a private user and mount
namespace (``unshare --user --map-root-user --mount``; no root needed, nothing mounted on
the host, the filesystem goes away with the soak). Runners enter it with ``nsenter``; the
soak reads the work directory through ``/proc/PID/root``. Only the output directory is
outside it.

At the end the last run goes uninterrupted to the job's end, and the soak checks that the
outputs (count.txt) and the stitched stdout of all runs (a resumed run rolls back to its
checkpoint: what a killed run printed after it is printed again, by design) hold 1..COUNT
exactly once, all from one boot, and prints

    kills: N, torn: T, lost: L, repeated: R

followed by the phase counts and anything that broke. Exit status 0 when T, L, R are 0 and
nothing else broke. If the job reaches COUNT before all kills are made, that round is checked
and a new one (a fresh boot) takes the remaining kills.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.runner_harness import Runner, wait_gone  # noqa: E402

EXIT_CHECKPOINTED = 85
EXIT_VM_DIED = 92
SAVING = re.compile(r"saving checkpoint (\d+)")
PUBLISHED = re.compile(r"checkpoint (\d+) published")
RESUMING = re.compile(r"resuming from checkpoint (\d+)")
RESUMED = re.compile(r"resumed the VM")
NOT_SAVED = re.compile(r"checkpoint (\d+) not saved")
#: Relative weights of the faults; kills are what --kills counts.
FAULTS = {"kill-running": 4, "kill-saving": 4, "kill-resuming": 4, "kill-qemu": 1,
          "storm": 1, "disk-full": 1}
KILLS = ("kill-running", "kill-saving", "kill-resuming", "kill-qemu")


class TimedRunner(Runner):
    """The harness's runner, with the time each stderr line arrived (how long resumes and
    saves take here, so that the kill windows fit this machine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.err_times: list[tuple[float, str]] = []
        super().__init__(*args, **kwargs)

    def _read(self, stream: object, out: bool) -> None:
        if out:
            return super()._read(stream, out)
        assert stream is not None
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.err.append(line)
                self.err_times.append((time.monotonic(), line))
                self.cond.notify_all()
        return None

    def between(self, first: re.Pattern[str], then: re.Pattern[str]) -> list[float]:
        """Seconds from each ``first`` line to the ``then`` line after it."""
        spans, since = [], None
        for when, line in self.err_times:
            if first.search(line):
                since = when
            elif since is not None and then.search(line):
                spans.append(when - since)
                since = None
        return spans


class SmallFs:
    """A size-limited tmpfs in a private user+mount namespace, held open by a sleeping
    process: unprivileged, nothing mounted where the host sees it, gone with the holder."""

    def __init__(self, mountpoint: Path, size_mib: int) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        script = 'mount -t tmpfs -o size="$2"m vmbuild-soak "$1" && echo ready && ' \
                 'exec sleep infinity'
        self.proc = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", str(mountpoint), str(size_mib)],
            stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":  # the mount is made: an event
            self.close()
            raise SystemExit("cannot mount a tmpfs in a user namespace (unshare -Urm)")
        self.filler = self.host(mountpoint / "filler")

    def host(self, path: Path) -> Path:
        """``path`` (inside the namespace) as this process can reach it."""
        return Path(f"/proc/{self.proc.pid}/root") / path.relative_to("/")

    def prefix(self) -> list[str]:
        """How to start a program inside (nsenter execs it: its pid is the program's)."""
        return ["nsenter", "-t", str(self.proc.pid), "-U", "-m", "--"]

    def free(self) -> int:
        st = os.statvfs(self.host(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Take all but ``leave`` bytes (tmpfs allocates on fallocate: instant)."""
        size = max(0, self.free() - leave)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Cycle:
    fault: str
    rc: int | None = None
    numbers: list[int] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    phase: str | None = None  # where a kill landed
    seq_before: int | None = None
    seq_after: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Tally:
    kills: int = 0
    torn: int = 0
    lost: int = 0
    repeated: int = 0
    phases: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    broke: list[str] = field(default_factory=list)
    rounds: int = 0


def qemu_children(pid: int) -> list[int]:
    """QEMU processes whose parent is ``pid`` (the runner)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"qemu-system" in cmd:
            found.append(int(entry))
    return found


def landed(err: list[str], had_numbers: bool, qemu_at_kill: bool,
           seq_after: int | None) -> str:
    """Where the runner was when it died, from its own last step line on stderr, whether
    QEMU existed at the kill, and the manifest left behind."""
    phase, saving = "starting", None
    for line in err:
        if RESUMING.search(line) or "merged the checkpoint" in line:
            phase = "resuming:prepare"
        elif "converting" in line and "qcow2" in line:
            phase = "preparing"
        elif "resumed the VM" in line:
            phase = "running"
        elif "started the VM" in line:
            phase = "booting"
        elif m := SAVING.search(line):
            phase, saving = "saving", int(m.group(1))
        elif PUBLISHED.search(line) or NOT_SAVED.search(line):
            phase = "running"
    if phase == "saving" and saving is not None and seq_after == saving:
        phase = "saving:published"  # after the manifest's rename, before the log line
    if phase == "resuming:prepare" and qemu_at_kill:
        phase = "resuming:loading-state"
    if phase == "booting" and had_numbers:
        phase = "running"
    return phase


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.vmx = Path(args.image).resolve()
        self.base = Path(tempfile.mkdtemp(prefix="vmbuild-soak-", dir=args.tmp))
        self.fs = SmallFs(self.base / "fs", args.fs_mib)
        self.tally = Tally()
        self.round = 0
        self.work = self.fs.mountpoint / "work"
        self.out = self.base / "out"
        self.cycles: list[Cycle] = []
        # measured here, as the soak goes (a save, a resume): kills spread over 1.3x these
        self.save_spans: list[float] = []
        self.resume_spans: list[float] = []

    def window(self, spans: list[float], default: float) -> float:
        recent = sorted(spans[-20:])
        return 1.3 * recent[len(recent) // 2] if recent else default

    # ----------------------------------------------------------- helpers

    def runner(self, *extra: str) -> TimedRunner:
        argv: list[str | Path] = [self.vmx, "--workdir", self.work, "--output-dir", self.out,
                                  "--keep-base", "--checkpoint-every",
                                  f"{self.args.checkpoint_every}s", *extra]
        return TimedRunner(*argv, program=[*self.fs.prefix(), sys.executable, "-m",
                                      "vmbuild.runner"])

    def sequence(self) -> int | None:
        try:
            data = json.loads(self.fs.host(self.work / "checkpoint.json").read_text())
        except FileNotFoundError:
            return None
        return int(data["sequence"])

    def log(self, text: str) -> None:
        if not self.args.quiet_progress:
            print(text, flush=True)

    def reap(self, r: TimedRunner, cycle: Cycle, timeout: float = 300) -> None:
        try:
            cycle.rc = r.wait(timeout)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            cycle.rc = r.wait(60)
            cycle.notes.append(f"the runner did not exit within {timeout:.0f}s")
        cycle.numbers = r.numbers
        cycle.err = list(r.err)
        cycle.seq_after = self.sequence()
        left = wait_gone(str(self.work))
        if left:
            cycle.notes.append(f"QEMU outlived its runner: {left}")
            for pid in left:
                os.kill(pid, signal.SIGKILL)

    def wait_numbers(self, r: TimedRunner, timeout: float = 300) -> None:
        r.wait_output(timeout)

    # ----------------------------------------------------------- one round

    def start_round(self) -> None:
        """A fresh boot, its first number, a first checkpoint (SIGUSR1)."""
        self.round += 1
        self.tally.rounds += 1
        shutil.rmtree(self.fs.host(self.work), ignore_errors=True)
        shutil.rmtree(self.out, ignore_errors=True)
        self.cycles = []
        self.log(f"round {self.round}: fresh boot (COUNT={self.args.count}, "
                 f"INTERVAL={self.args.interval})")
        r = self.runner("--env", f"COUNT={self.args.count}",
                        "--env", f"INTERVAL={self.args.interval}")
        cycle = Cycle("boot")
        self.wait_numbers(r)
        r.signal(signal.SIGUSR1)
        self.reap(r, cycle)
        if cycle.rc != EXIT_CHECKPOINTED:
            raise SystemExit(f"the first checkpoint failed ({cycle.rc}): {r.describe()}")
        self.cycles.append(cycle)

    def one(self, fault: str) -> Cycle:
        cycle = Cycle(fault, seq_before=self.sequence())
        r = self.runner()
        qemu_at_kill = False
        try:
            if fault == "kill-resuming":
                r.wait_err("resuming from checkpoint")
                time.sleep(self.rng.uniform(0, self.window(self.resume_spans,
                                                           self.args.resume_window)))
            elif fault == "kill-saving":
                r.wait_err("saving checkpoint")
                time.sleep(self.rng.uniform(0, self.window(self.save_spans,
                                                           self.args.save_window)))
            elif fault in ("kill-running", "kill-qemu"):
                self.wait_numbers(r)
                time.sleep(self.rng.uniform(0, self.args.run_window))
            elif fault == "storm":
                if self.rng.random() < 0.5:
                    r.wait_err("resuming from checkpoint")
                    time.sleep(self.rng.uniform(0, self.args.resume_window))
                else:
                    self.wait_numbers(r)
                for _ in range(self.rng.randint(5, 30)):
                    if r.proc.poll() is not None:
                        break
                    r.signal(signal.SIGUSR1)
                    time.sleep(self.rng.uniform(0, 0.03))
            elif fault == "disk-full":
                self.wait_numbers(r)
                self.fs.fill(self.args.leave_mib << 20)
                try:
                    if self.rng.random() < 0.5:
                        cycle.fault = "disk-full:signal"
                        r.signal(signal.SIGUSR1)
                        r.wait_err("not saved")
                    else:  # the periodic save fails, the job goes on, a later one works
                        cycle.fault = "disk-full:periodic"
                        r.wait_err("not saved")
                finally:
                    self.fs.unfill()
                if cycle.fault == "disk-full:periodic":
                    before = len([e for e in r.err if PUBLISHED.search(e)])
                    deadline = time.monotonic() + 120
                    while len([e for e in r.err if PUBLISHED.search(e)]) <= before:
                        assert time.monotonic() < deadline and r.proc.poll() is None, \
                            "no checkpoint after the space came back"
                        with r.cond:
                            r.cond.wait(1.0)
                    r.signal(signal.SIGUSR1)
        except AssertionError as exc:
            # the run ended before the moment came (the job finished, or it failed)
            if r.proc.poll() is None:
                cycle.notes.append(f"{fault}: {str(exc)[:300]}")
                r.proc.kill()
        if fault in KILLS and r.proc.poll() is None:
            qemu = qemu_children(r.proc.pid)
            qemu_at_kill = bool(qemu)
            if fault == "kill-qemu":
                if qemu:
                    os.kill(qemu[0], signal.SIGKILL)
                else:
                    cycle.notes.append("kill-qemu: no QEMU child found")
                    r.proc.kill()
            else:
                r.proc.kill()
        self.reap(r, cycle)
        self.save_spans += r.between(SAVING, PUBLISHED)
        self.resume_spans += r.between(RESUMING, RESUMED)
        if fault in KILLS and cycle.rc in (-9, EXIT_VM_DIED):
            if fault == "kill-qemu" and cycle.rc == EXIT_VM_DIED:
                cycle.phase = "running:qemu-killed"
            elif fault != "kill-qemu":
                cycle.phase = landed(cycle.err, bool(cycle.numbers), qemu_at_kill,
                                     cycle.seq_after)
        return cycle

    def judge(self, cycle: Cycle) -> None:
        """Per-run checks: what each fault must leave behind."""
        t = self.tally
        text = "\n".join(cycle.err)
        resumed = [int(m.group(1)) for m in map(RESUMING.search, cycle.err) if m]
        if cycle.seq_before is not None:
            if any("started the VM" in e for e in cycle.err):
                t.lost += 1
                t.broke.append(f"{cycle.fault}: checkpoint {cycle.seq_before} existed, "
                               "yet the VM started afresh")
            elif resumed and resumed[0] != cycle.seq_before:
                t.lost += 1
                t.broke.append(f"{cycle.fault}: resumed checkpoint {resumed[0]}, "
                               f"not the published {cycle.seq_before}")
        if cycle.rc == 90 or "unreadable checkpoint" in text or \
                "checkpoint's files are missing" in text or "resuming the saved VM" in text:
            t.torn += 1
            t.broke.append(f"{cycle.fault}: exit {cycle.rc}: {cycle.err[-3:]}")
        if cycle.rc == 93:
            t.lost += 1
            t.broke.append(f"{cycle.fault}: outputs lost (93)")
        if "Traceback" in text:
            t.broke.append(f"{cycle.fault}: a traceback on stderr: {cycle.err[-5:]}")
        if cycle.fault == "kill-qemu" and cycle.rc not in (EXIT_VM_DIED, 0):
            t.broke.append(f"kill-qemu: exit {cycle.rc}, not 92")
        if cycle.fault == "kill-qemu" and cycle.rc == EXIT_VM_DIED and \
                "is kept" not in text:
            t.broke.append("kill-qemu: the runner did not keep the checkpoint")
        if cycle.fault == "storm" and cycle.rc not in (EXIT_CHECKPOINTED, 0):
            t.broke.append(f"storm: exit {cycle.rc}, not 85: {cycle.err[-3:]}")
        if cycle.fault.startswith("disk-full") and cycle.rc != 0:
            if cycle.rc != EXIT_CHECKPOINTED:
                t.broke.append(f"{cycle.fault}: exit {cycle.rc}, not 85: {cycle.err[-3:]}")
            if not any("previous checkpoint" in e and "is kept" in e for e in cycle.err):
                t.broke.append(f"{cycle.fault}: no 'previous checkpoint ... is kept' line")
        for note in cycle.notes:
            t.broke.append(note)

    def verify_round(self, final: Cycle) -> None:
        """The round's outputs and stdout: 1..COUNT once each, one boot."""
        t, count = self.tally, self.args.count
        expected = list(range(1, count + 1))
        if final.rc != 0:
            t.broke.append(f"round {self.round}: the last run exited {final.rc}: "
                           f"{final.err[-5:]}")
        try:
            numbers = [int(x) for x in (self.out / "count.txt").read_text().split()]
            boots = (self.out / "boots.txt").read_text().split()
        except (OSError, ValueError) as exc:
            t.lost += 1
            t.broke.append(f"round {self.round}: outputs unreadable: {exc}")
            return
        dupes = sum(c - 1 for c in collections.Counter(numbers).values() if c > 1)
        t.repeated += dupes + max(0, len(boots) - 1)
        t.lost += len(set(expected) - set(numbers))
        if numbers != expected:
            t.broke.append(f"round {self.round}: count.txt is not 1..{count}: "
                           f"{numbers[:10]}...{numbers[-10:]}")
        # stdout, stitched: a run continues from its checkpoint, so anything a killed run
        # printed after it comes again; within a run, numbers follow one another.
        stitched: list[int] = []
        for cycle in self.cycles:
            nums = cycle.numbers
            if nums and cycle.rc == -9 and len(nums) > 1 and nums[-1] != nums[-2] + 1:
                nums = nums[:-1]  # a line cut by the kill
            for i, x in enumerate(nums):
                if i == 0:
                    if x > len(stitched) + 1:
                        t.lost += x - len(stitched) - 1
                        t.broke.append(f"stdout: a run began at {x} after {len(stitched)}")
                    stitched = stitched[:x - 1]
                elif x != nums[i - 1] + 1:
                    if x <= nums[i - 1]:
                        t.repeated += 1
                    else:
                        t.lost += x - nums[i - 1] - 1
                    t.broke.append(f"stdout of one run jumps {nums[i - 1]} -> {x}")
                    stitched = stitched[:x - 1]
                stitched.append(x)
        if stitched != expected:
            t.broke.append(f"round {self.round}: stitched stdout is not 1..{count}")
        result = json.loads(self.fs.host(self.work / "result.json").read_text())
        started = {e.get("boot_id") for e in result.get("events", [])
                   if e.get("event") == "started"}
        if len(started) != 1 or (boots and boots[0] not in started and None not in started):
            t.repeated += max(0, len(started) - 1)
            t.broke.append(f"round {self.round}: boot ids {started} vs boots.txt {boots}")

    # ----------------------------------------------------------- the soak

    def run(self) -> int:
        t = self.tally
        began = time.monotonic()
        try:
            self.start_round()
            while t.kills < self.args.kills:
                if self.args.plan:  # a fixed order (the test suite's short soak)
                    fault = self.args.plan[sum(t.faults.values()) % len(self.args.plan)]
                else:
                    kinds = self.args.faults
                    fault = self.rng.choices(kinds, weights=[FAULTS[k] for k in kinds])[0]
                cycle = self.one(fault)
                self.cycles.append(cycle)
                t.faults[cycle.fault] += 1
                if cycle.fault in KILLS and cycle.rc in (-9, EXIT_VM_DIED):
                    t.kills += 1
                    t.phases[cycle.phase or "?"] += 1
                self.judge(cycle)
                self.log(f"[{time.monotonic() - began:6.0f}s] {cycle.fault:<20} "
                         f"exit {cycle.rc!s:>3} phase {cycle.phase or '-':<24} "
                         f"checkpoint {cycle.seq_before} -> {cycle.seq_after}, "
                         f"numbers {cycle.numbers[:1]}..{cycle.numbers[-1:]}"
                         + (f"  {cycle.notes}" if cycle.notes else ""))
                for line in cycle.err:
                    if NOT_SAVED.search(line):
                        self.log(f"{'':9}{line}")
                if cycle.rc == 0:  # the job reached COUNT: check this round, start another
                    self.verify_round(cycle)
                    if t.kills < self.args.kills:
                        self.start_round()
                elif cycle.rc not in (-9, EXIT_VM_DIED, EXIT_CHECKPOINTED):
                    t.broke.append(f"{cycle.fault}: unexpected exit {cycle.rc}; stopping")
                    break
            else:
                final = Cycle("final", seq_before=self.sequence())
                r = self.runner()
                self.reap(r, final, timeout=3600)
                self.cycles.append(final)
                self.judge(final)
                self.log(f"[{time.monotonic() - began:6.0f}s] final run: exit {final.rc}, "
                         f"numbers {final.numbers[:1]}..{final.numbers[-1:]}")
                self.verify_round(final)
        finally:
            self.fs.close()
            if not self.args.keep:
                shutil.rmtree(self.base, ignore_errors=True)
        wall = time.monotonic() - began
        print(f"kills: {t.kills}, torn: {t.torn}, lost: {t.lost}, repeated: {t.repeated}")
        print("phases: " + ", ".join(f"{k} {v}" for k, v in sorted(t.phases.items())))
        print("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(t.faults.items())))
        med = statistics.median
        print(f"measured: save {med(self.save_spans or [0]):.2f}s, resume "
              f"{med(self.resume_spans or [0]):.2f}s (medians)")
        print(f"rounds: {t.rounds}, seed: {self.args.seed}, wall time: {wall:.0f}s")
        for problem in t.broke:
            print(f"broke: {problem}")
        ok = not (t.torn or t.lost or t.repeated or t.broke) and t.kills >= self.args.kills
        return 0 if ok else 1


def default_image() -> str:
    root = Path(os.environ.get("VMBUILD_TEST_IMAGES", "/tmp/imgs3"))
    return str(root / "counter" / "counter.vmx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: chosen and printed)")
    parser.add_argument("--image", default=default_image(),
                        help="the counter image's .vmx (default: "
                             "$VMBUILD_TEST_IMAGES/counter/counter.vmx)")
    parser.add_argument("--count", type=int, default=None,
                        help="numbers to count (default: 60 + 1 per kill: kills soon "
                             "after a resume commit about one number each; a job that ends "
                             "early starts another round)")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between numbers in the guest")
    parser.add_argument("--checkpoint-every", type=float, default=2.0)
    parser.add_argument("--run-window", type=float, default=2.0,
                        help="kill-running: up to this long after the first number")
    parser.add_argument("--save-window", type=float, default=1.0,
                        help="kill-saving: up to this long after 'saving checkpoint' until a save "
                             "was measured (then 1.3x the median save)")
    parser.add_argument("--resume-window", type=float, default=4.0,
                        help="kill-resuming: up to this long after 'resuming' until a resume "
                             "was measured (then 1.3x the median resume)")
    parser.add_argument("--fs-mib", type=int, default=1536,
                        help="size of the work directory's tmpfs")
    parser.add_argument("--leave-mib", type=int, default=4,
                        help="disk-full: free space left on the work directory's filesystem")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="which faults to inject (comma-separated; default all: "
                             f"{', '.join(FAULTS)}); at least one kill kind")
    parser.add_argument("--plan", default="",
                        help="faults in this order, repeated (instead of random choices; "
                             "the delays stay random)")
    parser.add_argument("--tmp", default=None, help="where the soak's directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the soak's directory")
    parser.add_argument("--quiet-progress", action="store_true")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if set(args.faults) - set(FAULTS) or not set(args.faults) & set(KILLS):
        parser.error(f"--faults: choose from {', '.join(FAULTS)}, with at least one kill")
    args.plan = [f.strip() for f in args.plan.split(",") if f.strip()]
    if set(args.plan) - set(FAULTS) or (args.plan and not set(args.plan) & set(KILLS)):
        parser.error(f"--plan: choose from {', '.join(FAULTS)}, with at least one kill")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    if args.count is None:
        args.count = 60 + args.kills
    if not Path(args.image).is_file():
        parser.error(f"{args.image}: no counter image (build examples/counter)")
    print(f"soak: {args.kills} kills, seed {args.seed}, image {args.image}", flush=True)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())

