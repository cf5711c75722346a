"""Prove an image before it ships: lint the .vmx/.vmdk, then boot it and watch the job run.

The boot uses QEMU with the devices the .vmx declares (pvscsi, vmxnet3, AHCI and NVMe are all
emulated), on a throwaway qcow2 layer so the image itself is never written. It passes only
when the job service reported its start and its exit status over the control port and the VM
then powered itself off within the bound.
"""

from __future__ import annotations

import codecs
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmbuild.errors import UsageError, ValidationError
from vmbuild.events import Event, Reporter, Stage
from vmbuild.runner.accel import best_accelerator, qemu_binary
from vmbuild.runner.contract import (
    CONSOLE_LOG,
    CONTROL_LOG,
    JOB_LOG,
    JobOutputFilter,
    parse_control,
)
from vmbuild.runner.qemu_devices import qemu_argv
from vmbuild.runner.vmx import load_vmx, vmx_info
from vmbuild.stages.artifact import lint_vmx

DEFAULT_BOOT_TIMEOUT = 600.0  # TCG boots take ~30 s; the job's own time comes on top


@dataclass
class BootResult:
    status: int | None
    powered_off: bool
    seconds: float
    job_output: str
    console_tail: str
    control: list[dict[str, object]] = field(default_factory=list)


def lint(vmx: Path) -> list[str]:
    if not vmx.is_file():
        raise UsageError(f"{vmx}: no such file")
    return lint_vmx(vmx)


def boot(vmx: Path, report: Reporter, *, timeout: float = DEFAULT_BOOT_TIMEOUT,
         keep_logs: Path | None = None) -> BootResult:
    """Boot the image once on a throwaway layer and collect what the guest contract reports."""
    binary = qemu_binary()
    if binary is None:
        raise UsageError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    info = vmx_info(load_vmx(vmx))
    with tempfile.TemporaryDirectory(prefix="vmbuild-validate-") as tmp:
        work = Path(tmp) if keep_logs is None else keep_logs
        work.mkdir(parents=True, exist_ok=True)
        overrides: dict[str, str | tuple[str, str]] = {}
        for index, disk in enumerate(info.disks):
            source = (vmx.parent / disk.file_name).resolve()
            layer = work / f"layer{index}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b",
                            str(source), str(layer)], check=True, capture_output=True)
            overrides[disk.file_name] = (str(layer), "qcow2")
        logs = [work / CONSOLE_LOG, work / JOB_LOG, work / CONTROL_LOG]
        for log in logs:
            log.write_bytes(b"")
        argv = [binary, *qemu_argv(info, vmx.parent, disk_override=overrides,
                                   serial_paths=[str(p) for p in logs],
                                   accel=best_accelerator()), "-no-reboot"]
        return _watch(argv, logs, report, timeout)


def _watch(argv: list[str], logs: list[Path], report: Reporter, timeout: float) -> BootResult:
    console, job, control = logs
    qemu_log = console.with_name("qemu.log")  # a file, not a pipe nobody reads until the end
    started = time.monotonic()
    output = JobOutputFilter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    job_output = ""
    pending_line = ""
    powered_off = False
    with qemu_log.open("wb") as qemu_out, job.open("rb") as job_in, \
            subprocess.Popen(argv, stdout=qemu_out, stderr=subprocess.STDOUT) as proc:
        while True:
            try:
                proc.wait(timeout=0.5)
                powered_off = True
            except subprocess.TimeoutExpired:
                pass
            fresh = decoder.decode(output.feed(job_in.read()))  # only what is new
            if fresh:
                job_output += fresh
                *lines, pending_line = (pending_line + fresh).split("\n")
                for line in lines:
                    report(Event("validate", "output", line.rstrip("\r")))
            if powered_off:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                proc.wait()
                break
    qemu_said = qemu_log.read_text(errors="replace")
    if pending_line:
        report(Event("validate", "output", pending_line))
    seconds = time.monotonic() - started
    result = parse_control(control.read_text(errors="replace"))
    tail = console.read_text(errors="replace")[-3000:]
    if powered_off and proc.returncode != 0:
        tail += "\nQEMU: " + qemu_said.strip()
    return BootResult(result.status, powered_off, seconds, job_output, tail, result.events)


def validate_image(vmx: Path, report: Reporter, *, boot_test: bool = True,
                   timeout: float = DEFAULT_BOOT_TIMEOUT, expect_status: int = 0,
                   logs: Path | None = None) -> BootResult | None:
    """Lint, then boot; raise ValidationError with every reason found."""
    with Stage(report, "validate", f"linting {vmx.name}"):
        problems = lint(vmx)
    if problems:
        raise ValidationError(f"{vmx}: the image failed its lint:\n  - " + "\n  - ".join(problems))
    if not boot_test:
        return None
    with Stage(report, "validate", f"boot test of {vmx.name} (QEMU, {best_accelerator()})"):
        result = boot(vmx, report, timeout=timeout, keep_logs=logs)
        reasons = []
        started = any(e.get("event") == "started" for e in result.control)
        if not started:
            reasons.append("the job service never reported that it started")
        elif result.status is None:
            reasons.append("the job started but never reported an exit status")
        elif result.status != expect_status:
            reasons.append(f"the job exited with status {result.status} "
                           f"(expected {expect_status})")
        if not result.powered_off:
            reasons.append(f"the VM did not power itself off within {timeout:.0f}s")
        if reasons:
            raise ValidationError(
                f"{vmx}: the boot test failed: " + "; ".join(reasons)
                + "\n  last console lines:\n    "
                + "\n    ".join(result.console_tail.splitlines()[-15:]))
        report(Event("validate", "step",
                     f"job exited {result.status} and the VM powered off after "
                     f"{result.seconds:.0f}s", {"seconds": round(result.seconds, 1)}))
    return result
