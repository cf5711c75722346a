#!/usr/bin/env python3
"""A stand-in for ``vmbuild run`` in scheduler tests: no VM, the same checkpoint contract.

Counts 1..COUNT, one number a line on stdout every INTERVAL seconds. On SIGUSR1, SIGTERM or
SIGQUIT it saves its position (taking SAVE_SECONDS, like a VM writing its memory), publishes
the checkpoint atomically (write a temporary file, rename) and exits 85. Started again on the
same --workdir it resumes from the published checkpoint; a kill during the save leaves the
previous checkpoint (or none). Repeated signals during a save are ignored, as the real
runner must (Slurm signals every process of the job, and the batch script forwards too).
When the count is complete it writes OUTPUT_DIR/done.txt and exits 0. ``--checkpoint-at
N,M`` also checkpoints (the same save) and exits 85 on reaching N, then M: HTCondor's
self-checkpointing (``checkpoint_exit_code``), as ``vmbuild run --exit-after-checkpoint`` does.

    fake_runner.py --count N --interval S --save-seconds S --workdir DIR --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_CHECKPOINTED = 85
_requested: list[int] = []


def _on_signal(signum: int, _frame: object) -> None:
    if not _requested:
        _requested.append(signum)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--save-seconds", type=float, default=1.0)
    parser.add_argument("--checkpoint-at", default="")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    args, _unknown = parser.parse_known_args()
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, _on_signal)

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.workdir / "checkpoint.json"
    start = 1
    if checkpoint.exists():
        start = int(json.loads(checkpoint.read_text())["next"])
        print(f"fake-runner: resumed at {start}", flush=True)
    else:
        print("fake-runner: fresh start", flush=True)

    checkpoint_at = {int(x) for x in args.checkpoint_at.split(",") if x.strip()}
    n = start
    while n <= args.count:
        periodic = n in checkpoint_at and n != start
        if _requested or periodic:
            began = time.monotonic()
            name = signal.Signals(_requested[0]).name if _requested else "periodic"
            print(f"fake-runner: {name}: saving at {n}", flush=True)
            tmp = args.workdir / "checkpoint.json.tmp"
            with open(tmp, "w") as f:
                json.dump({"next": n}, f)
                f.flush()
                time.sleep(args.save_seconds)  # the VM's memory going to disk
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint)
            print(f"fake-runner: checkpoint published at {n} after "
                  f"{time.monotonic() - began:.1f} s; exit {EXIT_CHECKPOINTED}", flush=True)
            return EXIT_CHECKPOINTED
        print(n, flush=True)
        n += 1
        deadline = time.monotonic() + args.interval
        while not _requested and time.monotonic() < deadline:
            time.sleep(0.02)
    (args.output_dir / "done.txt").write_text(f"counted to {args.count}\n")
    print("fake-runner: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
