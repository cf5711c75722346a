"""The soak's short version (bench/soak.py, issue 11 item 3): one boot of the counter image,
then every kind of fault once, in a fixed order with a fixed seed — SIGKILL of the runner
while resuming, saving and running, SIGKILL of QEMU, a SIGUSR1 storm, the work directory's
filesystem full at a checkpoint (by signal and by the periodic timer) — and the count must
come out whole: 1..COUNT once each, from one boot, in the outputs and in stdout.

The 100-kill run is `bench/soak.py --kills 100`; this one keeps the suite's time down.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

PLAN = ["kill-resuming", "disk-full", "kill-saving", "storm", "kill-qemu", "disk-full",
        "kill-running"]


def test_short_soak(counter_vmx: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--kills", "4", "--seed", "11",
         "--image", str(counter_vmx), "--plan", ",".join(PLAN), "--tmp", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=1200)
    report = proc.stdout + proc.stderr
    assert "kills: 4, torn: 0, lost: 0, repeated: 0\n" in proc.stdout, report
    assert proc.returncode == 0, report
    assert "broke:" not in proc.stdout, report
    # every fault happened (the disk-full variant is chosen by the seed)
    faults = next(line for line in proc.stdout.splitlines() if line.startswith("faults: "))
    for kind in ("kill-resuming", "kill-saving", "storm", "kill-qemu", "kill-running",
                 "disk-full"):
        assert kind in faults, report
    assert "previous checkpoint" in proc.stdout, report  # the disk-full line was shown
