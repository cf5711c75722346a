"""The boot test's verdicts, from what a run reported (fast: no VM). Each way a boot can go
wrong gets its own words, so a researcher reads the cause, not "it failed"."""

from __future__ import annotations

from typing import Any

import pytest

from vmbuild.runner.core import RunOutcome
from vmbuild.stages.validate import (
    BootResult,
    BootSpec,
    boot_phases,
    failure_reasons,
    result_data,
)

STARTED = {"event": "started", "boot_id": "b1"}


def result(events: list[dict[str, Any]], outcome: RunOutcome, output: str = "",
           console: str = "") -> BootResult:
    status = next((e.get("status") for e in events if e["event"] in ("exited", "timeout")),
                  None)
    return BootResult(status, outcome, 30.0, output, console, events)


def test_a_clean_run_passes() -> None:
    run = result([STARTED, {"event": "exited", "status": 0}], RunOutcome(0, "poweroff"),
                 "RESULT 7\n")
    assert failure_reasons(run, BootSpec(expect_output=r"^RESULT \d+$")) == []
    assert result_data(run, BootSpec())["mode"] == "exit"


@pytest.mark.parametrize(("events", "outcome", "console", "words"), [
    ([STARTED], RunOutcome(92, "reboot"), "", "the guest rebooted"),
    ([STARTED], RunOutcome(92, "panic"), "", "the guest kernel panicked"),
    ([STARTED], RunOutcome(91, None, timed_out="run"),
     "[ 9.1] Kernel panic - not syncing: sysrq triggered crash", "the guest kernel panicked"),
    ([STARTED], RunOutcome(92, "crash", stop_detail="QEMU killed by SIGSEGV"), "",
     "the hypervisor crashed (QEMU killed by SIGSEGV)"),
    ([], RunOutcome(90, None, timed_out="start"), "", "did not start within"),
    ([STARTED], RunOutcome(91, None, timed_out="run"), "",
     "the job was still running at the boot test's timeout (600s)"),
    ([STARTED, {"event": "timeout", "status": 124}], RunOutcome(91, "poweroff",
                                                                timed_out="job"), "",
     "exceeded its own job.timeout"),
    ([STARTED, {"event": "exited", "status": 0}], RunOutcome(0, "reboot"), "",
     "after the job: the guest rebooted"),
    ([STARTED, {"event": "exited", "status": 0}], RunOutcome(91, None, timed_out="run"), "",
     "did not power itself off"),
])
def test_each_failure_names_its_cause(events: list[dict[str, Any]], outcome: RunOutcome,
                                      console: str, words: str) -> None:
    reasons = failure_reasons(result(events, outcome, console=console), BootSpec())
    assert len(reasons) == 1 and words in reasons[0], reasons


def test_until_started_passes_on_a_job_still_running_and_records_how_long() -> None:
    spec = BootSpec(until="started", running_for=20)
    run = result([STARTED], RunOutcome(0, "poweroff", ran_for=20.4, clean_shutdown=True),
                 "step 1\n")
    assert failure_reasons(run, spec) == []
    assert result_data(run, spec) == {"mode": "started", "seconds": 30.0, "status": None,
                                      "outputs": 0, "ran_for": 20.4, "clean_shutdown": True}
    # A long job that fails at once is caught all the same.
    crashed = result([STARTED, {"event": "exited", "status": 1}], RunOutcome(1, "poweroff"))
    assert failure_reasons(crashed, spec) == ["the job exited with status 1 (expected 0)"]


def test_boot_phases_come_from_the_wrappers_events_and_refuse_nonsense() -> None:
    """The manifest says where a validation boot's time went; the numbers are guest-written,
    so anything but a plausible number yields no figure rather than a wrong one."""
    good = [{"event": "started", "uptime": 7.5},
            {"event": "boot", "kernel": 1.25, "initrd": 1.5, "userspace_start": 2.75}]
    assert boot_phases(good) == {"kernel": 1.25, "initrd": 1.5, "init_and_wrapper": 4.75,
                                 "to_job": 7.5}
    for bad in ({"uptime": "7"}, {"uptime": True}, {"uptime": float("nan")}, {"uptime": -1},
                {"uptime": 1e12}, {"uptime": 2.0}):  # 2.0: before userspace began
        assert boot_phases([{**good[0], **bad}, good[1]]) == {}
    assert boot_phases(good[:1]) == {}
    assert boot_phases([]) == {}
