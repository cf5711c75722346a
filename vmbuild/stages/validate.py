"""Prove an image before it ships: lint the .vmx/.vmdk, then boot it and watch the job run.

The boot is a real run of the image by the runner's QEMU backend (the same code that runs it
on an execute node), on a throwaway work directory: the image is never written. What the
boot runs and expects comes from the recipe's ``validate:`` section or from ``vmbuild
validate``'s options, and reaches the guest only through the input disk, exactly as ``vmbuild
run --input/--arg/--env`` would send it, so nothing of it is baked into the image.

Two modes. ``until: exit`` (default): the job must report its start and the expected exit
status, and the VM must then power itself off. ``until: started``, for jobs that run for
hours: the job must start and keep running for ``running_for``; then the runner presses the
ACPI power button and, after a bounded wait, stops the VM. Either way a failure says why:
the job's status, a guest that rebooted or panicked, a timeout, or QEMU itself crashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild.errors import UsageError, ValidationError
from vmbuild.events import Event, Reporter, Stage
from vmbuild.runner import core
from vmbuild.runner.accel import best_accelerator, qemu_binary
from vmbuild.runner.contract import CONSOLE_LOG, parse_control
from vmbuild.runner.vmx import load_vmx, vmx_info
from vmbuild.stages.artifact import lint_vmx

DEFAULT_BOOT_TIMEOUT = 600.0  # TCG boots take ~20 s; the job's own time comes on top
SHUTDOWN_GRACE = 60.0  # after the ACPI power button, before the VM is stopped
PANIC_TEXT = "Kernel panic - not syncing"


@dataclass(frozen=True)
class BootSpec:
    """What a boot test runs and expects: the recipe's ``validate:`` or the CLI's options."""

    command: tuple[str, ...] | None = None  # None: the image's job command
    inputs: tuple[Path, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    expect_exit: int = 0
    expect_output: str | None = None  # a regex that must match one line of job output
    until: str = "exit"  # exit | started
    running_for: float = 30.0
    timeout: float = DEFAULT_BOOT_TIMEOUT

    @classmethod
    def from_recipe(cls, validate: Any) -> BootSpec:
        """From a recipe's ``validate`` section (vmbuild.recipe.model.Validate)."""
        return cls(command=validate.command, inputs=tuple(validate.inputs),
                   environment=dict(validate.environment), expect_exit=validate.expect.exit,
                   expect_output=validate.expect.output, until=validate.until,
                   running_for=validate.running_for, timeout=validate.timeout)

    @property
    def mode(self) -> str:
        if self.until == "started":
            return f"started and kept running for {self.running_for:g}s"
        return f"ran to completion with exit status {self.expect_exit}"


@dataclass
class BootResult:
    status: int | None  # the job's exit status, when it reported one
    outcome: core.RunOutcome
    seconds: float
    job_output: str
    console_tail: str
    control: list[dict[str, object]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # files the job returned

    @property
    def started(self) -> bool:
        return any(e.get("event") == "started" for e in self.control)

    @property
    def finished(self) -> bool:
        return any(e.get("event") in ("exited", "timeout") for e in self.control)


def lint(vmx: Path) -> list[str]:
    if not vmx.is_file():
        raise UsageError(f"{vmx}: no such file")
    return lint_vmx(vmx)


class _LineSink:
    """The job's output as ``validate`` output events, one per line (a file-like sink for
    the runner's JobStreams)."""

    def __init__(self, report: Reporter) -> None:
        self.report = report
        self.text = ""
        self._pending = b""

    def write(self, data: bytes) -> None:
        *lines, self._pending = (self._pending + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.text += line + "\n"
            self.report(Event("validate", "output", line))

    def flush(self) -> None:
        """Nothing is buffered but an unfinished line, which waits for its newline."""

    def close(self) -> None:
        if self._pending:
            line = self._pending.decode("utf-8", "replace").rstrip("\r")
            self.text += line
            self.report(Event("validate", "output", line))
            self._pending = b""


@contextlib.contextmanager
def _runner_log(report: Reporter) -> Iterator[None]:
    """The runner's own messages become validate steps (not stray lines on stderr)."""
    previous = core.set_log_sink(lambda message: report(Event("validate", "step", message)))
    try:
        yield
    finally:
        core.set_log_sink(previous)


def boot(vmx: Path, report: Reporter, spec: BootSpec,
         keep_logs: Path | None = None) -> BootResult:
    """Run the image once with the runner's QEMU backend on a throwaway work directory."""
    if qemu_binary() is None:
        raise UsageError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    for item in spec.inputs:
        if not item.exists():
            raise UsageError(f"validation input {item}: no such file or directory")
    from vmbuild.runner.qemu import QemuBackend  # needs qemu.qmp; only a boot does

    with tempfile.TemporaryDirectory(prefix="vmbuild-validate-") as tmp:
        work = Path(tmp) / "run"
        work.mkdir()
        options = core.RunOptions(
            vmx=vmx.resolve(), workdir=work.resolve(), inputs=list(spec.inputs),
            env=dict(spec.environment), output_dir=Path(tmp) / "outputs",
            command=list(spec.command) if spec.command else None,
            timeout=spec.timeout, start_timeout=spec.timeout, quiet=False,
            run_for=spec.running_for if spec.until == "started" else None,
            shutdown_grace=SHUTDOWN_GRACE, checkpoint_signals=[])
        sink = _LineSink(report)
        started = time.monotonic()

        async def run() -> core.RunOutcome:
            core.check_workdir(options.workdir, options.vmx)
            streams = core.JobStreams(options.workdir, stdout=sink)
            try:
                backend = QemuBackend(options, streams)
                await core.drive(backend, options, install_signals=False)
                assert backend.outcome is not None
                return backend.outcome
            finally:
                streams.close()

        with _runner_log(report):
            try:
                outcome = asyncio.run(run())
            except core.RunnerError as exc:
                raise ValidationError(f"{vmx}: the boot test could not run: {exc}") from exc
        sink.close()
        seconds = time.monotonic() - started
        control = core.read_json(work / core.RESULT, "run result") or {}
        events = [e for e in control.get("events", []) if isinstance(e, dict)]
        if not events:  # the run ended before finish() wrote its result
            events = parse_control((work / "control.log").read_text(errors="replace")).events
        outputs_dir = Path(tmp) / "outputs"
        outputs = sorted(str(p.relative_to(outputs_dir)) for p in outputs_dir.rglob("*")
                         if p.is_file()) if outputs_dir.is_dir() else []
        try:
            tail = (work / CONSOLE_LOG).read_text(errors="replace")[-4000:]
        except OSError:
            tail = ""
        status = next((e.get("status") for e in reversed(events)
                       if e.get("event") in ("exited", "timeout")), None)
        if keep_logs is not None:  # the logs, not the disk layers
            keep_logs.mkdir(parents=True, exist_ok=True)
            for name in (*core.LOGS, core.RESULT):
                if (work / name).is_file():
                    shutil.copy2(work / name, keep_logs / name)
        return BootResult(status if isinstance(status, int) else None, outcome, seconds,
                          sink.text, tail, events, outputs)


def failure_reasons(result: BootResult, spec: BootSpec) -> list[str]:
    """Why the boot test failed, one cause each, most telling first (empty: it passed)."""
    outcome = result.outcome
    panicked = outcome.stop_reason == "panic" or PANIC_TEXT in result.console_tail
    if outcome.timed_out in ("run", "start"):
        if panicked:
            return ["the guest kernel panicked (seen on the console); the VM hung until the "
                    f"boot test's timeout ({spec.timeout:g}s)"]
        if not result.started:
            return [f"the job did not start within the boot test's timeout ({spec.timeout:g}s)"]
        if result.finished:
            return [f"the job exited {result.status} but the VM did not power itself off "
                    f"within the boot test's timeout ({spec.timeout:g}s)"]
        hint = "" if spec.until == "started" else \
            " (a long job can be validated with validate.until: started)"
        return [f"the job was still running at the boot test's timeout ({spec.timeout:g}s)"
                + hint]
    if outcome.timed_out == "job":
        return ["the job exceeded its own job.timeout and was killed by the job wrapper"]
    if not result.started:
        return [f"the job service never reported that it started: {outcome.describe()}"]
    if outcome.ran_for is not None:  # until: started, and it kept running: that is the proof
        return _output_reasons(result, spec)
    if not result.finished:
        return [f"the job started but never reported an exit status: {outcome.describe()}"]
    reasons = []
    if result.status != spec.expect_exit:
        reasons.append(f"the job exited with status {result.status} "
                       f"(expected {spec.expect_exit})")
    if outcome.stop_reason not in (None, "poweroff"):
        reasons.append(f"after the job: {outcome.describe()}")
    return reasons + _output_reasons(result, spec)


def _output_reasons(result: BootResult, spec: BootSpec) -> list[str]:
    if spec.expect_output is None:
        return []
    pattern = re.compile(spec.expect_output)
    if any(pattern.search(line) for line in result.job_output.splitlines()):
        return []
    return [f"no line of the job's output matched {spec.expect_output!r}"]


# QEMU's EFI firmware (Debian's OVMF) has drivers for virtio, PVSCSI, AHCI and NVMe disks but
# not for the LSI Logic and BusLogic controllers (their drivers are left out of its build): a
# validation boot of such an image stops in the UEFI shell ("map: No mapping found").
QEMU_EFI_CANNOT_BOOT = ("lsilogic", "lsisas1068", "buslogic")


def qemu_cannot_boot(firmware: str, controller: str) -> str | None:
    """Why the QEMU validation boot cannot start this hardware, or None. VMware boots it."""
    if firmware == "efi" and controller in QEMU_EFI_CANNOT_BOOT:
        return (f"the QEMU validation boot cannot boot firmware: efi from a {controller} disk "
                "controller (QEMU's EFI firmware, OVMF, has no driver for it; VMware does): "
                "use pvscsi, sata or nvme with efi, or skip the boot test with --no-validate")
    return None


def validate_image(vmx: Path, report: Reporter, *, boot_test: bool = True,
                   spec: BootSpec | None = None, logs: Path | None = None) -> BootResult | None:
    """Lint, then boot; raise ValidationError with every reason found."""
    spec = spec or BootSpec()
    with Stage(report, "validate", f"linting {vmx.name}"):
        problems = lint(vmx)
    if problems:
        raise ValidationError(f"{vmx}: the image failed its lint:\n  - " + "\n  - ".join(problems))
    if not boot_test:
        return None
    info = vmx_info(load_vmx(vmx))
    why = qemu_cannot_boot(info.firmware, info.disks[0].controller) if info.disks else None
    if why:
        raise ValidationError(f"{vmx}: {why}")
    what = f"boot test of {vmx.name} (QEMU, {best_accelerator()}; until {spec.until})"
    with Stage(report, "validate", what):
        result = boot(vmx, report, spec, keep_logs=logs)
        reasons = failure_reasons(result, spec)
        if reasons:
            raise ValidationError(
                f"{vmx}: the boot test failed: " + "; ".join(reasons)
                + "\n  last console lines:\n    "
                + "\n    ".join(result.console_tail.splitlines()[-15:]))
        report(Event("validate", "step", summary(result), result_data(result, spec)))
    return result


def summary(result: BootResult) -> str:
    outcome = result.outcome
    if outcome.ran_for is not None:
        how = "powered off cleanly" if outcome.clean_shutdown else \
            "was stopped (it ignored the ACPI power button)"
        return (f"the job started and was still running after {outcome.ran_for:.0f}s; "
                f"the VM {how} after {result.seconds:.0f}s in all")
    return f"job exited {result.status} and the VM powered off after {result.seconds:.0f}s"


def result_data(result: BootResult, spec: BootSpec) -> dict[str, Any]:
    """The proof, for manifests and ``--json``: which mode proved the image and how."""
    data: dict[str, Any] = {"mode": spec.until, "seconds": round(result.seconds, 1),
                            "status": result.status, "outputs": len(result.outputs)}
    if result.outcome.ran_for is not None:
        data["ran_for"] = round(result.outcome.ran_for, 1)
        data["clean_shutdown"] = result.outcome.clean_shutdown
    phases = boot_phases(result.control)
    if phases:
        data["boot_phases"] = phases
    return data


def boot_phases(events: Sequence[dict[str, object]]) -> dict[str, float]:
    """Where the boot's time went until the job started (kernel, initramfs, then the init,
    systemd or vmbuild-init, and the wrapper), from the wrapper's `started` and `boot`
    events. Guest-written: only plain,
    plausible numbers are taken, and nothing is derived from a figure that is missing."""
    def number(value: object) -> float | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0 <= value < 86400:
            return float(value)
        return None

    last = {str(e.get("event")): e for e in events}
    uptime = number(last.get("started", {}).get("uptime"))
    boot = last.get("boot", {})
    kernel, initrd, userspace = (number(boot.get(k)) for k in ("kernel", "initrd",
                                                               "userspace_start"))
    if uptime is None or kernel is None or initrd is None or userspace is None \
            or userspace > uptime:
        return {}
    return {"kernel": round(kernel, 2), "initrd": round(initrd, 2),
            "init_and_wrapper": round(uptime - userspace, 2), "to_job": round(uptime, 2)}


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` options as a mapping (shared by the CLI's boot-test options)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env
