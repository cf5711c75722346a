"""How long a suspend-to-disk takes, so the scheduler waits for it before its hard kill.

One estimate serves both schedulers: HTCondor's ``job_max_vacate_time`` and the lead time
of Slurm's ``--signal=B:USR1@N``. A suspend writes (at most) the guest's whole memory to
disk, so the time is memory / write speed plus a fixed cost (stopping the VM, publishing
the checkpoint), times a safety margin, and never below a floor or below a suspend time
someone measured on real nodes (times the same margin: one node's figure is no promise for
the next).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_WRITE_MIB_S = 100.0  # a slow local disk or a busy network file system
DEFAULT_OVERHEAD_S = 15.0  # stop the VM, sync, publish the checkpoint manifest
DEFAULT_MARGIN = 2.0
DEFAULT_FLOOR_S = 60


@dataclass(frozen=True)
class SuspendEstimate:
    """The inputs and the answer, kept together so files can say how N was reached."""

    memory_mib: int
    write_mib_s: float = DEFAULT_WRITE_MIB_S
    overhead_s: float = DEFAULT_OVERHEAD_S
    margin: float = DEFAULT_MARGIN
    floor_s: int = DEFAULT_FLOOR_S
    measured_s: float | None = None

    def __post_init__(self) -> None:
        if self.memory_mib <= 0:
            raise ValueError(f"memory must be positive, not {self.memory_mib} MiB")
        if self.write_mib_s <= 0:
            raise ValueError(f"write speed must be positive, not {self.write_mib_s} MiB/s")
        if self.margin < 1:
            raise ValueError(f"margin must be at least 1, not {self.margin}")
        if self.overhead_s < 0 or self.floor_s < 0 or (self.measured_s or 0) < 0:
            raise ValueError("overhead, floor and measured time cannot be negative")

    @property
    def raw_seconds(self) -> float:
        """Memory / write speed + overhead, or the measured time when that is longer."""
        computed = self.memory_mib / self.write_mib_s + self.overhead_s
        return max(computed, self.measured_s or 0.0)

    @property
    def seconds(self) -> int:
        """Whole seconds the scheduler must wait between its soft signal and its hard kill."""
        return max(math.ceil(self.raw_seconds * self.margin), self.floor_s)

    def explain(self) -> str:
        """One line for a comment in the generated file."""
        measured = f", measured {self.measured_s:g} s" if self.measured_s is not None else ""
        return (f"suspend estimate: {self.memory_mib} MiB / {self.write_mib_s:g} MiB/s "
                f"+ {self.overhead_s:g} s{measured}, x{self.margin:g}, "
                f"floor {self.floor_s} s -> {self.seconds} s")


def suspend_seconds(
    memory_mib: int,
    *,
    write_mib_s: float = DEFAULT_WRITE_MIB_S,
    overhead_s: float = DEFAULT_OVERHEAD_S,
    margin: float = DEFAULT_MARGIN,
    floor_s: int = DEFAULT_FLOOR_S,
    measured_s: float | None = None,
) -> int:
    """Seconds to allow for suspending a guest of ``memory_mib`` (see :class:`SuspendEstimate`)."""
    return SuspendEstimate(memory_mib, write_mib_s, overhead_s, margin, floor_s,
                           measured_s).seconds
