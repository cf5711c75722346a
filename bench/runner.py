#!/usr/bin/env python3
"""Benchmark the runner's checkpoint path on the counter example (a 512 MiB guest, QEMU).

For each run: boot the counter job in a fresh work directory, measure the runner's own CPU
use while the job runs (its process only, not QEMU's), send SIGUSR1 and time the runner's
exit (suspend latency), measure the checkpoint on disk, then start the runner again on the
work directory and time until the job's output continues (resume latency; the job prints a
number a second, so this includes up to 1 s of waiting for the next number). Prints the
median of the runs, and with --baseline the ratio to a second image run alternately with it
in the same invocation (for example the same recipe built before a change).

    .venv/bin/python bench/runner.py --runs 3 [--image OUT/counter/counter.vmx]
                                              [--baseline OLD/counter/counter.vmx]

Without --image it uses $VMBUILD_TEST_IMAGES/counter/counter.vmx, building it there (or in
a temporary directory) with `vmbuild` when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.runner_harness import Runner  # noqa: E402
from vmbuild.runner.core import manifest_files  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def checkpoint_size(work: Path) -> tuple[int, int, int]:
    """(bytes allocated on disk, apparent bytes, saved-state bytes) of the checkpoint."""
    manifest = json.loads((work / "checkpoint.json").read_text())
    names = manifest_files(manifest)  # the image's own disk is not part of a checkpoint
    allocated = sum((work / n).stat().st_blocks * 512 for n in names)
    apparent = sum((work / n).stat().st_size for n in names)
    return allocated, apparent, (work / manifest["state"]).stat().st_size


def image(args: argparse.Namespace) -> Path:
    if args.image:
        return Path(args.image)
    root = Path(os.environ.get("VMBUILD_TEST_IMAGES") or tempfile.mkdtemp(prefix="bench-"))
    vmx = root / "counter" / "counter.vmx"
    if not vmx.is_file():
        subprocess.run([sys.executable, "-m", "vmbuild.cli",
                        str(REPO / "examples" / "counter" / "recipe.yaml"),
                        "-o", str(root / "counter")], check=True)
    return vmx


def one_run(vmx: Path, work: Path, cpu_window: float) -> dict[str, float]:
    begun = time.monotonic()
    runner = Runner(vmx, "--workdir", work, "--env", "COUNT=100000", "--quiet")
    # --quiet: the job's output still goes to job.log; follow that instead of stdout
    log = work / "job.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and any(x.strip().isdigit() for x in log.read_text().split())):
        if time.monotonic() > deadline or runner.proc.poll() is not None:
            raise SystemExit("the job did not start: " + runner.describe())
        time.sleep(0.2)
    fresh = time.monotonic() - begun  # the baseline: a cold boot to the job's first output
    c0, t0 = cpu_seconds(runner.proc.pid), time.monotonic()
    time.sleep(cpu_window)
    cpu = (cpu_seconds(runner.proc.pid) - c0) / (time.monotonic() - t0)
    sent = runner.signal(signal.SIGUSR1)
    rc = runner.wait(300)
    suspend = time.monotonic() - sent
    if rc != 85:
        raise SystemExit(f"checkpoint failed ({rc}): {runner.describe()}")
    allocated, apparent, state = checkpoint_size(work)
    last = max(int(x) for x in log.read_text().split() if x.isdigit())
    started = time.monotonic()
    again = Runner(vmx, "--workdir", work)
    when = again.wait_number(last + 1, timeout=300)
    resume = when - started
    again.signal(signal.SIGUSR1)
    again.wait(300)
    return {"cpu_percent": 100 * cpu, "suspend_s": suspend, "resume_s": resume,
            "fresh_start_s": fresh,
            "checkpoint_allocated_mib": allocated / 2**20,
            "checkpoint_apparent_mib": apparent / 2**20, "state_mib": state / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default=None)
    parser.add_argument("--baseline", default=None,
                        help="a second counter image (e.g. built before a change), run "
                        "alternately with the first; each figure gets its ratio to it")
    parser.add_argument("--cpu-window", type=float, default=10.0,
                        help="seconds over which the runner's CPU use is measured")
    args = parser.parse_args()
    images = {"image": image(args)}
    if args.baseline:
        images["baseline"] = Path(args.baseline)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in images}
    for n in range(args.runs):
        for name, vmx in images.items():
            work = Path(tempfile.mkdtemp(prefix="bench-runner-"))
            try:
                result = one_run(vmx, work, args.cpu_window)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results[name].append(result)
            print(f"run {n + 1} {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in result.items()),
                  flush=True)
    vmx = images["image"]
    print(f"\nmedian of {args.runs} runs (guest: {vmx.name}, 512 MiB, QEMU)"
          + ("; ratio to the baseline image" if args.baseline else "") + ":")
    labels = {
        "suspend_s": "suspend latency (SIGUSR1 to runner exit), s",
        "resume_s": "resume latency (runner start to the next number), s",
        "fresh_start_s": "fresh start (runner start to the first number), s",
        "checkpoint_allocated_mib": "checkpoint on disk (allocated, all layers + state), MiB",
        "checkpoint_apparent_mib": "checkpoint apparent size, MiB",
        "state_mib": "  of which the saved VM state, MiB",
        "cpu_percent": "runner CPU while the job runs (runner process only), %",
    }
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in labels}
               for name, runs in results.items()}
    for key, label in labels.items():
        value = medians["image"][key]
        base = medians.get("baseline", {}).get(key)
        ratio = f"  baseline {base:8.2f}  ({value / base:.2f}x)" if base else ""
        print(f"  {label:<58} {value:8.2f}{ratio}")
    mine = medians["image"]
    print(f"  {'resume / fresh start':<58} {mine['resume_s'] / mine['fresh_start_s']:8.2f}x")
    return 0

if __name__ == "__main__":
    sys.exit(main())
