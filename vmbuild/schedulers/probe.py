"""The machine probe for HTCondor (STARTD_CRON). It lives in :mod:`vmbuild.runner.probe`
(standard library only, shipped in the runner bundle); this module re-exports it."""

from vmbuild.runner.probe import (
    RUNNER_VERSION,
    classad_value,
    condor_config_snippet,
    main,
    probe_attributes,
    probe_lines,
    qemu_version,
    vmware_version,
)

__all__ = [
    "RUNNER_VERSION",
    "classad_value",
    "condor_config_snippet",
    "main",
    "probe_attributes",
    "probe_lines",
    "qemu_version",
    "vmware_version",
]
