"""The machine probe for HTCondor (STARTD_CRON). It lives in :mod:`vmbuild.runner.probe`
(standard library only, shipped in the runner bundle); this module re-exports it."""

from vmbuild.runner.probe import (
    RUNNER_VERSION,
    VmwareProduct,
    can_run_x86_guests,
    classad_value,
    condor_config_snippet,
    detect_vmware,
    main,
    max_hw_version,
    probe_attributes,
    probe_lines,
    qemu_version,
    vmrun_host_type,
    vmware_version,
)

__all__ = [
    "RUNNER_VERSION",
    "VmwareProduct",
    "can_run_x86_guests",
    "classad_value",
    "condor_config_snippet",
    "detect_vmware",
    "main",
    "max_hw_version",
    "probe_attributes",
    "probe_lines",
    "qemu_version",
    "vmrun_host_type",
    "vmware_version",
]
