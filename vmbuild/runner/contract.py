"""The guest contract, host side: serial ports, disk labels, control messages, exit codes.

The image's job wrapper (vmbuild/guest/vmbuild-job) is the other half; the two must agree on
everything here. Standard library only: the runner ships alone to execute nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# COM1..COM3 as files beside the VM.
CONSOLE_LOG = "console.log"  # COM1 / ttyS0: kernel and system console
JOB_LOG = "job.log"  # COM2 / ttyS1: the job's stdout and stderr
CONTROL_LOG = "control.log"  # COM3 / ttyS2: JSON lines from the wrapper only

# The wrapper writes this line on COM2 right before the job starts; anything before it on
# COM2 is firmware noise (OVMF mirrors its console to every serial port), never job output.
JOB_OUTPUT_MARKER = "=== vmbuild: job output follows ===\n"

INPUT_LABEL = "VMBINPUT"
OUTPUT_LABEL = "VMBOUTPUT"

# Exit statuses of `vmbuild run` besides the job's own (documented in the README and --help).
EXIT_CHECKPOINTED = 85  # HTCondor's conventional checkpoint_exit_code
EXIT_VM_START_FAILED = 90
EXIT_JOB_TIMEOUT = 91
EXIT_VM_DIED = 92
#: The job finished but its outputs could not all be returned to --output-dir (an unreadable
#: or crafted output filesystem, more than the output limit, a host error): never a silent
#: success. result.json says why, and keeps the job's own status as "job_status".
EXIT_OUTPUTS_LOST = 93
EXIT_USAGE = 2


@dataclass
class JobReport:
    """What the control channel said, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    partial: str = ""  # an unterminated last line, kept until its newline arrives

    def feed(self, data: str) -> list[dict[str, Any]]:
        """Add raw control-port text; return the complete events it finished."""
        text = self.partial + data
        lines = text.split("\n")
        self.partial = lines.pop()
        new = []
        for line in lines:
            line = line.strip().strip("\r")
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "event" in record:
                self.events.append(record)
                new.append(record)
        return new

    @property
    def started(self) -> bool:
        return any(e["event"] == "started" for e in self.events)

    @property
    def finished(self) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event["event"] in ("exited", "timeout"):
                found: dict[str, Any] = event
                return found
        return None

    @property
    def status(self) -> int | None:
        end = self.finished
        if end is None:
            return None
        status = end.get("status")
        return status if isinstance(status, int) else None

    @property
    def timed_out(self) -> bool:
        end = self.finished
        return end is not None and end["event"] == "timeout"

    @property
    def boot_ids(self) -> list[str]:
        return [str(e.get("boot_id", "")) for e in self.events if e["event"] == "started"]


def parse_control(text: str) -> JobReport:
    report = JobReport()
    report.feed(text + "\n")
    return report


class JobOutputFilter:
    """Pass COM2 bytes through, minus whatever came before the wrapper's start marker.

    `started=True` is for a VM resumed from a checkpoint taken after the job had started:
    its COM2 carries only job output from the first byte.
    """

    _marker = JOB_OUTPUT_MARKER.encode()

    def __init__(self, started: bool = False) -> None:
        self.started = started
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        if self.started:
            return data
        self._pending += data
        index = self._pending.find(self._marker)
        if index < 0:
            # Keep only a tail long enough to hold a marker split across reads.
            self._pending = self._pending[-len(self._marker):]
            return b""
        self.started = True
        rest = self._pending[index + len(self._marker):]
        self._pending = b""
        return rest
