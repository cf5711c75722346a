"""Count 1..N, one number a second, to stdout and to $OUTPUTS/count.txt (fsync'ed).

Environment: COUNT (N, default 20), INTERVAL (seconds between numbers, default 1),
EXIT_STATUS (the status to exit with, default 0). Each start appends the kernel's boot id
to boots.txt, so a reboot (instead of a resume) shows as a second line there.
"""

import os
import sys
import time
from pathlib import Path

outputs = Path(os.environ.get("OUTPUTS", "/var/lib/job/output"))
count = int(os.environ.get("COUNT", "20"))
interval = float(os.environ.get("INTERVAL", "1"))
status = int(os.environ.get("EXIT_STATUS", "0"))


def append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


outputs.mkdir(parents=True, exist_ok=True)
boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
append(outputs / "boots.txt", boot_id)
print(f"counter: counting to {count}, boot {boot_id}", flush=True)
for n in range(1, count + 1):
    append(outputs / "count.txt", str(n))
    print(n, flush=True)
    if n < count:
        time.sleep(interval)
print(f"counter: done, exiting {status}", flush=True)
sys.exit(status)
