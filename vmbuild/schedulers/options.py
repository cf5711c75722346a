"""Options shared by the HTCondor and the Slurm writers (one object; each uses its part)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.schedulers.estimate import (
    DEFAULT_FLOOR_S,
    DEFAULT_MARGIN,
    DEFAULT_OVERHEAD_S,
    DEFAULT_WRITE_MIB_S,
    SuspendEstimate,
)
from vmbuild.schedulers.image import ImageFacts

_MIB = 1024 * 1024
BUNDLE_NAME = "vmbuild-run.pyz"
CHECKPOINT_EXIT_CODE = 85


@dataclass(frozen=True)
class SubmitOptions:
    """How to run an image under a scheduler. Defaults suit a first try on a real pool."""

    # --- suspend-time estimate (both schedulers)
    write_mib_s: float = DEFAULT_WRITE_MIB_S
    suspend_overhead_s: float = DEFAULT_OVERHEAD_S
    suspend_margin: float = DEFAULT_MARGIN
    suspend_floor_s: int = DEFAULT_FLOOR_S
    measured_suspend_s: float | None = None
    # --- resources
    memory_overhead_mib: int = 512  # QEMU/VMware process, page cache for the save
    request_memory_mib: int | None = None  # override the computed request
    request_disk_mib: int | None = None  # override the computed request
    request_cpus: int | None = None  # override the image's vCPU count
    # --- the job
    inputs: Sequence[Path] = ()  # files/directories given to every job (--input)
    item_inputs: Sequence[str] = ()  # one job per item, each item an extra --input (condor)
    queue: int = 1  # jobs per item (condor)
    checkpoint_every: str | None = None  # runner --checkpoint-every DURATION
    backend: str | None = None  # runner --backend qemu|vmware; also narrows condor requirements
    job_env: Sequence[str] = ()  # KEY=VALUE for the job in the guest (runner --env)
    chirp_interval: str | None = None  # runner --chirp-interval (condor, +WantIOProxy)
    runner_args: Sequence[str] = ()  # appended to the runner command line
    bundle: str = BUNDLE_NAME  # the runner zipapp, relative to the output directory
    # --- HTCondor
    kill_sig: str = "SIGUSR1"
    require_kvm: bool = False
    min_probe_version: str | None = None  # versioncmp() on VMBUILD_RUNNER_VERSION
    extra: Sequence[str] = ()  # extra "key = value" lines (condor submit / #SBATCH options)
    # --- Slurm
    time_limit: str | None = None  # --time, e.g. "4:00:00"
    partition: str | None = None
    account: str | None = None
    signal: str = "USR1"  # sent (B:) to the batch shell N seconds before the time limit
    signal_lead: bool = True  # write --signal=B:SIG@N (turn off only to show why it is needed)
    work_root: str | None = None  # default ${VMBUILD_WORK_ROOT:-$HOME/.vmbuild-work}
    output_dir: str | None = None  # default $SLURM_SUBMIT_DIR/NAME-outputs.$SLURM_JOB_ID
    python: str = "python3"  # the interpreter that runs the bundle on the node
    runner_command: Sequence[str] | None = None  # replaces "python3 BUNDLE run IMAGE.vmx"
    keep_work: bool = False  # keep the work directory after a finished job
    job_name: str | None = None
    comments: bool = True

    def estimate(self, memory_mib: int) -> SuspendEstimate:
        return SuspendEstimate(memory_mib, self.write_mib_s, self.suspend_overhead_s,
                               self.suspend_margin, self.suspend_floor_s,
                               self.measured_suspend_s)

    def memory_request(self, guest_mib: int) -> int:
        """MiB to ask for: the guest plus the hypervisor's own overhead."""
        if self.request_memory_mib is not None:
            return self.request_memory_mib
        return guest_mib + self.memory_overhead_mib

    def disk_request_mib(self, facts: ImageFacts, inputs_bytes: int = 0) -> int:
        """MiB of scratch disk: the image as shipped, its transport forms expanded (the
        runner keeps the expanded VMDK while it runs), the runner's qcow2 working copy (a
        compressed VMDK unpacked: about 4x, at most the disk's capacity), two memory states
        (the published checkpoint and the one being written), the inputs, 1 GiB to spare."""
        if self.request_disk_mib is not None:
            return self.request_disk_mib
        work_copy = 4 * facts.working_disk_bytes
        if facts.disk_capacity_bytes:
            work_copy = min(work_copy, facts.disk_capacity_bytes)
        total = facts.size_bytes + facts.expanded_bytes + work_copy + inputs_bytes \
            + 2 * facts.memory_mib * _MIB + 1024 * _MIB
        return -(-total // _MIB)
