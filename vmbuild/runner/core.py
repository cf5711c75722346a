"""The backend-neutral runner core: options, work directory, checkpoint manifest, signals,
job I/O bookkeeping and exit codes.

A backend (``qemu``, ``vmware``) knows how to start, pause, save and stop one VM; this module
decides *when*: it maps signals to actions, streams the job's output, reads the job's status
from the control channel and turns everything into one exit status.

The work directory holds everything a resumed run needs. Its only mutable entry point is
``checkpoint.json``, replaced atomically (write a temporary file, fsync, ``os.replace``,
fsync the directory): a run killed at any instant leaves either the previous manifest or the
new one, never a half-written one. Every file the manifest names is complete before the
manifest that names it is published; everything it does not name is garbage that the next
start removes. Names in the manifest are relative to the work directory, so the directory
can be moved or copied to another path and resumed there.

Standard library only: the runner ships alone to execute nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract import (
    EXIT_CHECKPOINTED,
    EXIT_JOB_TIMEOUT,
    EXIT_OUTPUTS_LOST,
    EXIT_USAGE,
    EXIT_VM_DIED,
    EXIT_VM_START_FAILED,
    JobOutputFilter,
    JobReport,
)

if TYPE_CHECKING:
    from .transport import Expansion

MANIFEST = "checkpoint.json"
MANIFEST_VERSION = 1
RESULT = "result.json"
LOCK = "runner.lock"
#: Files the runner may create in a work directory; only these are ever garbage-collected,
#: so a work directory that also holds a user's files does not lose them.
_OWNED = re.compile(
    r"^(?:.*\.qcow2|.*\.mig|.*\.mig\.zst|.*\.tmp|.*\.raw|.*\.vmss|.*\.vmem|.*\.vmdk"
    r"|.*\.vmx|\.stage-.*|expanded-[0-9a-f]{16})$"
)
#: Logs kept across runs (appended to), never collected.
LOGS = ("console.log", "job.log", "control.log", "qemu.log")

DEFAULT_CHECKPOINT_SIGNALS = ("USR1", "TERM", "QUIT")

EXIT_CODES_HELP = f"""\
exit status:
  N    the job's own exit status (the guest's job wrapper reports it on COM3)
  {EXIT_CHECKPOINTED}   the VM was checkpointed to the work directory and the runner left
       (the checkpoint exit code, --checkpoint-exit-code); run again to resume.
       Also when the save failed (a full disk): the previous checkpoint is kept
  {EXIT_VM_START_FAILED}   the VM failed to start (or to resume from its checkpoint; also: an
       image shipped as NAME.vmdk.zst on a host without zstd)
  {EXIT_JOB_TIMEOUT}   the job timed out (--timeout, or the image's own job timeout)
  {EXIT_VM_DIED}   the VM stopped without reporting a job status (crash, poweroff, kill);
       if QEMU died after a checkpoint, that checkpoint is kept: run again to resume
  {EXIT_OUTPUTS_LOST}   the job finished but its outputs could not be returned to --output-dir
       (unreadable or crafted output filesystem, over the size limit); see result.json
  2    usage error
"""


#: Why a VM stopped, as a backend saw it (QEMU: QMP SHUTDOWN reason, GUEST_PANICKED, its
#: exit status); the words are what the runner and the validation boot print.
STOP_REASONS = {
    "poweroff": "the guest powered itself off",
    "reboot": "the guest rebooted (a reboot ends the VM: it runs with -no-reboot)",
    "panic": "the guest kernel panicked",
    "crash": "the hypervisor crashed",
    "host": "the host stopped the VM",
    "start": "the VM failed to start",
}


@dataclass
class RunOutcome:
    """How a run ended, for callers that need more than the exit status (validation)."""

    status: int
    stop_reason: str | None = None  # a STOP_REASONS key, when the VM stopped by itself
    stop_detail: str = ""  # e.g. QEMU's exit status and last words
    ran_for: float | None = None  # seconds the job ran before a run_for shutdown
    clean_shutdown: bool | None = None  # the guest obeyed the ACPI power button in time
    timed_out: str | None = None  # "job" (the image's job.timeout), "run" (--timeout), "start"

    def describe(self) -> str:
        reason = STOP_REASONS.get(self.stop_reason or "", "the VM stopped")
        return reason + (f" ({self.stop_detail})" if self.stop_detail else "")


class RunnerError(Exception):
    """A failure that ends the run with ``exit_code`` and a one-line message."""

    def __init__(self, message: str, exit_code: int = EXIT_VM_START_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- options


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1.5h``, ``500ms``, or ``1h30m`` -> seconds."""
    text = text.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", "", text).strip():
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h)")
    total = sum(float(n) * _UNITS[u or None] for n, u in parts)
    if total <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return total


def parse_signals(text: str) -> list[signal.Signals]:
    """``USR1,TERM,SIGQUIT`` -> the signals; an empty string means none."""
    result: list[signal.Signals] = []
    for item in text.split(","):
        name = item.strip().upper()
        if not name:
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal: {item.strip()!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTSTP, signal.SIGCONT):
            raise ValueError(f"{name} cannot be a checkpoint signal")
        if sig not in result:
            result.append(sig)
    return result


@dataclass
class RunOptions:
    vmx: Path
    workdir: Path
    inputs: list[Path] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    output_size_mib: int = 1024
    checkpoint_every: float | None = None
    checkpoint_signals: list[signal.Signals] = field(
        default_factory=lambda: parse_signals(",".join(DEFAULT_CHECKPOINT_SIGNALS)))
    checkpoint_exit_code: int = EXIT_CHECKPOINTED
    timeout: float | None = None
    start_timeout: float | None = 900.0  # boot to the job's "started" message
    accel: str | None = None
    vmware_type: str | None = None
    quiet: bool = False
    keep_base: bool = False  # keep the converted image disk in the work dir after leaving
    exit_after_checkpoint: bool = False  # periodic checkpoints end the run (HTCondor style)
    # One boot only (validation, `vmbuild shell`): never part of the image.
    command: list[str] | None = None  # replaces the image's job command
    shell: bool = False  # a root shell on the console instead of the job
    console: bool = False  # show the guest's console (COM1) live on stderr
    # Long jobs are proven by starting, not by finishing: once the job has run this long,
    # the VM is shut down (ACPI power button, then a bounded wait) and the run ends.
    run_for: float | None = None
    shutdown_grace: float = 60.0
    # VMware refused to resume a checkpoint (e.g. another host's CPU features): start the
    # job afresh from the image ("restart") or exit 90 keeping the checkpoint ("fail").
    on_resume_failure: str = "restart"
    # Under HTCondor with +WantIOProxy: seconds between the usage reports (None: the default).
    chirp_interval: float | None = None

    @property
    def wants_input_disk(self) -> bool:
        return bool(self.inputs or self.args or self.env or self.command or self.shell)


@dataclass
class SignalPlan:
    """What each signal does. ``checkpoint``: save and leave; ``stop``: power off and leave
    without saving; ``pause``/``resume``: SIGTSTP/SIGCONT."""

    checkpoint: set[signal.Signals]
    stop: set[signal.Signals]
    pause: signal.Signals = signal.SIGTSTP
    resume: signal.Signals = signal.SIGCONT


def signal_plan(checkpoint_signals: Iterable[signal.Signals]) -> SignalPlan:
    """SIGINT behaves as SIGTERM (checkpoint when SIGTERM does); TERM/INT/HUP that are not
    checkpoint signals stop the VM without saving."""
    chosen = set(checkpoint_signals)
    if signal.SIGTERM in chosen:
        chosen.add(signal.SIGINT)
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} - chosen
    return SignalPlan(checkpoint=chosen, stop=stop)


# --------------------------------------------------------------------------- work directory


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: the old file stands, no partial copy is left
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file the runner wrote, or None when absent; unreadable is an error."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunnerError(f"{path}: unreadable {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise RunnerError(f"{path}: not a {what}")
    return data


class Workdir:
    """The run's directory: checkpoint manifest, disk layers, saved state, logs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, name: str) -> Path:
        if "/" in name or name in ("", ".", ".."):
            raise RunnerError(f"bad file name in checkpoint manifest: {name!r}")
        return self.path / name

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def unique(self, prefix: str, suffix: str) -> str:
        """A new file name not in use (random, so a killed run's leftovers never collide)."""
        while True:
            name = f"{prefix}-{os.urandom(4).hex()}{suffix}"
            if not (self.path / name).exists():
                return name

    # manifest ---------------------------------------------------------------

    def load_manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        data = read_json(path, "checkpoint manifest")
        if data is None:
            return None
        if data.get("version") != MANIFEST_VERSION:
            raise RunnerError(f"{path}: not a checkpoint manifest this runner understands")
        missing = [n for n in manifest_files(data) if not (self.path / n).is_file()]
        if missing:
            raise RunnerError(f"{path}: the checkpoint's files are missing: {', '.join(missing)}")
        return data

    def publish(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` the checkpoint. Its files must already be complete: they are
        fsync'ed here before the manifest that names them is renamed into place."""
        manifest = {**manifest, "version": MANIFEST_VERSION, "published": time.time()}
        for name in manifest_files(manifest):
            fsync_path(self.file(name))
        fsync_path(self.path)
        write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n")

    def retire(self) -> None:
        """The job finished: the checkpoint is no longer something to resume."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / MANIFEST)
        fsync_path(self.path)

    def collect(self, keep: Iterable[str]) -> list[str]:
        """Delete runner-owned files not in ``keep``; return their names."""
        keep_set = set(keep) | {MANIFEST, RESULT, LOCK, *LOGS}
        removed: list[str] = []
        if not self.path.is_dir():
            return removed
        for entry in sorted(os.listdir(self.path)):
            if entry in keep_set or not _OWNED.match(entry):
                continue
            target = self.path / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            removed.append(entry)
        return removed


def manifest_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a checkpoint consists of (disk layers, saved state, extra files).

    A layer marked ``base`` is not part of it: it is the image's own disk converted to
    qcow2, remade from the image whenever it is missing, so it never travels with a
    checkpoint (a scheduler moving the work directory moves only what the job wrote).
    """
    names: list[str] = []
    for chain in manifest.get("disks", {}).values():
        names.extend(layer["file"] for layer in chain["layers"] if not layer.get("base"))
    if manifest.get("state"):
        names.append(manifest["state"])
    names.extend(manifest.get("files", []))
    return names


def source_key(path: Path) -> str:
    """Identifies an image disk by content, cheaply: its size, and its first and last MiB
    (a VMDK's header and descriptor, with the content ID its writer chose, and its grain
    tables or footer). Unlike a name or an mtime, this survives a scheduler copying the
    image to another sandbox, so a checkpoint finds its base again there."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- job I/O


class JobStreams:
    """Where the guest's serial ports go: job output to stdout (and job.log), control lines
    parsed into a :class:`JobReport` (and control.log)."""

    def __init__(self, workdir: Path, quiet: bool = False,
                 stdout: Any = None, known_events: list[dict[str, Any]] | None = None) -> None:
        self.report = JobReport()
        if known_events:
            self.report.events.extend(known_events)
        self.quiet = quiet
        self.out = stdout if stdout is not None else sys.stdout.buffer
        self.job_log = open(workdir / "job.log", "ab")  # noqa: SIM115 (closed in close())
        self.control_log = open(workdir / "control.log", "ab")  # noqa: SIM115
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.output_seen = asyncio.Event()
        self.bytes_out = 0
        if self.report.started:
            self.started.set()
        if self.report.finished:
            self.finished.set()
        # Firmware (OVMF) mirrors its console to every serial port; a resumed job is past it.
        self.output_filter = JobOutputFilter(started=self.report.started)

    def restore(self, events: list[dict[str, Any]]) -> None:
        """Take back the control events a checkpoint recorded (the VM resumes past them)."""
        self.report.events.extend(events)
        if self.report.started:
            self.started.set()
            self.output_filter.started = True  # COM2 now carries job output only
        if self.report.finished:
            self.finished.set()

    def job_output(self, data: bytes) -> None:
        data = self.output_filter.feed(data)
        if not data:
            return
        self.bytes_out += len(data)
        self.output_seen.set()
        self.job_log.write(data)
        self.job_log.flush()
        if not self.quiet:
            try:
                self.out.write(data)
                self.out.flush()
            except (BrokenPipeError, ValueError):
                self.quiet = True

    def control(self, data: bytes) -> None:
        if not data:
            return
        self.control_log.write(data)
        self.control_log.flush()
        for event in self.report.feed(data.decode("utf-8", "replace")):
            if event["event"] == "started":
                self.started.set()
            if event["event"] in ("exited", "timeout"):
                self.finished.set()

    def reset(self) -> None:
        """A fresh boot of the job (a refused resume restarts it from the image): what the
        old boot reported no longer counts."""
        self.report = JobReport()
        self.started.clear()
        self.finished.clear()
        self.output_filter = JobOutputFilter()

    @property
    def boot_id(self) -> str | None:
        ids = self.report.boot_ids
        return ids[-1] if ids else None

    def close(self) -> None:
        self.job_log.close()
        self.control_log.close()


def job_exit_status(report: JobReport) -> int:
    """The runner's exit status once the VM is gone."""
    if report.timed_out:
        return EXIT_JOB_TIMEOUT
    status = report.status
    if status is None:
        return EXIT_VM_DIED
    return status if 0 <= status <= 255 else EXIT_VM_DIED


# --------------------------------------------------------------------------- lifecycle


class Backend:
    """One VM. Subclasses implement the coroutines; :func:`drive` calls them."""

    name = "backend"

    def __init__(self, options: RunOptions, streams: JobStreams) -> None:
        self.options = options
        self.streams = streams
        self.exited = asyncio.Event()  # the VM is gone (powered off, crashed, quit)
        self.checkpointed = False  # a checkpoint was published by this run
        # Why the last save failed (a full work directory...), None after a published one:
        # the previous checkpoint is then what the work directory resumes from.
        self.checkpoint_failure: str | None = None
        self.elapsed_before = 0.0  # run time of the job before this run (from a checkpoint)
        self.vm_error: str | None = None  # the hypervisor failed (not a guest power-off)
        self.stop_reason: str | None = None  # a STOP_REASONS key, once the VM is gone
        self.outcome: RunOutcome | None = None  # set by drive() when the run ends
        self.resume_failures = 0  # refused resumes that restarted the job (result.json)
        # Image disks expanded from their transport form (.vmdk.zst) by this job's runs, each
        # as transport.Expansion.as_json(); carried in the checkpoint, kept in result.json.
        self.expansions: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Boot or resume the VM; return when it runs. RunnerError(90) when it cannot."""
        raise NotImplementedError

    async def checkpoint(self, leave: bool) -> None:
        """Save the VM's complete state and publish it. ``leave``: then stop the VM."""
        raise NotImplementedError

    async def pause(self) -> None:
        raise NotImplementedError

    async def unpause(self) -> None:
        raise NotImplementedError

    async def poweroff(self) -> None:
        """Stop the VM now, without saving."""
        raise NotImplementedError

    async def shutdown(self, grace: float) -> bool:
        """Ask the guest to shut down (ACPI power button); after ``grace`` seconds, power it
        off. True when the guest went by itself."""
        await self.poweroff()
        return False

    async def finish(self, status: int) -> int | None:
        """The job ended and the VM is gone: collect outputs, retire the checkpoint.

        Returns the run's final exit status (what :meth:`deliver` decided: 93 when the
        outputs could not be returned), or None to keep ``status``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release everything (called in all cases)."""

    def note_expansion(self, expansion: Expansion) -> None:
        """An image disk came from its transport form (a ``transport.Expansion``): say how
        long that took, and keep it for result.json."""
        log(expansion.describe())
        self.expansions.append(expansion.as_json())

    def expansion_result(self) -> dict[str, Any]:
        """result.json's part about transport forms: each expansion, and the seconds they
        cost this job (a scheduler's bench reads the sum)."""
        if not self.expansions:
            return {}
        seconds = sum(e["seconds"] for e in self.expansions if not e["reused"])
        return {"expansions": self.expansions, "expansion_seconds": round(seconds, 3)}

    def vm_pid(self) -> int | None:
        """The hypervisor process running the guest, for usage accounting (None: unknown)."""
        return None

    def vm_memory_mib(self) -> int:
        return 0

    async def deliver(self, status: int, output_disk: Path | None, workdir: Path) -> int:
        """Copy the outputs disk's files to --output-dir, record the job's result and return
        the run's exit status.

        Outputs that could not all be returned (no readable filesystem, a crafted one, more
        than the output limit) end the run with EXIT_OUTPUTS_LOST instead of the job's
        status, so a scheduler never mistakes lost outputs for success; result.json keeps
        the job's own status and says why. Entries deliberately not returned (links leading
        out, devices, FIFOs, bad names) are listed, on stderr and in result.json, but are
        not a failure."""
        from . import jobio  # jobio needs RunnerError from this module

        out = self.options.output_dir
        final = status
        outputs: dict[str, Any] | None = None
        if out is not None and output_disk is not None and output_disk.exists():
            try:
                got = await asyncio.to_thread(jobio.extract_outputs, output_disk, out)
                outputs = got.as_json()
                log(f"{len(got.files)} output file(s) and {len(got.links)} link(s) copied "
                    f"to {out}")
                for entry in got.dropped:
                    log(f"output {entry['path']!r} dropped: {entry['reason']}")
                for problem in got.problems:
                    log(f"output lost: {problem}")
                if not got.complete:
                    final = EXIT_OUTPUTS_LOST
            except (RunnerError, OSError) as exc:
                log(f"could not copy the outputs: {exc}")
                outputs = {"complete": False, "problems": [str(exc)], "dropped": []}
                final = EXIT_OUTPUTS_LOST
            if final == EXIT_OUTPUTS_LOST:
                log(f"exit {EXIT_OUTPUTS_LOST}: the job finished (status {status}) but its "
                    f"outputs could not all be returned to {out}")
        result: dict[str, Any] = {"status": final, "job_status": status,
                                  "events": self.streams.report.events,
                                  "resume_failures": self.resume_failures,
                                  "finished": time.time()}
        result.update(self.expansion_result())
        if outputs is not None:
            result["outputs"] = outputs
            result["dropped"] = outputs["dropped"]
        (workdir / RESULT).write_text(json.dumps(result, indent=1) + "\n")
        return final


def _usage_reporter(backend: Backend, interval: float | None) -> Any:
    """Under HTCondor with +WantIOProxy, report the guest's CPU and memory into the job ad."""
    from .chirp import UsageReporter

    reporter = UsageReporter(backend.vm_pid, backend.vm_memory_mib(), interval=interval)
    if not reporter.enabled:
        return None
    log("reporting the VM's CPU and memory use to HTCondor (chirp)")
    return reporter.start()


def _stderr_log(message: str) -> None:
    print(f"vmbuild-run: {message}", file=sys.stderr, flush=True)


_log_sink: Callable[[str], None] = _stderr_log


def log(message: str) -> None:
    """The runner's messages: stderr for ``vmbuild run``, progress events for a validation."""
    _log_sink(message)


def set_log_sink(sink: Callable[[str], None]) -> Callable[[str], None]:
    """Send the runner's messages to ``sink``; returns the previous sink, to restore."""
    global _log_sink
    previous, _log_sink = _log_sink, sink
    return previous


async def drive(backend: Backend, options: RunOptions,
                install_signals: bool = True, ignore_after: bool = False) -> int:
    """Run the VM to the end of the job, a checkpoint-and-exit, a timeout or a failure.

    The exit status is returned; how the run ended in more detail is left in
    ``backend.outcome``. ``ignore_after`` (the runner's own process): once the run is over,
    the checkpoint and pause signals are ignored rather than given back their default
    action, so a scheduler's repeated soft kill (or a storm of them) arriving while the
    runner leaves cannot kill it with the signal instead of its exit status (seen in
    bench/soak.py: SIGUSR1 right after a published checkpoint ended the runner with -10)."""
    status = await _drive(backend, options, install_signals, ignore_after)
    if backend.outcome is None:
        backend.outcome = RunOutcome(status, backend.stop_reason)
    backend.outcome.status = status
    return status


async def _drive(backend: Backend, options: RunOptions, install_signals: bool,
                 ignore_after: bool = False) -> int:
    loop = asyncio.get_running_loop()
    plan = signal_plan(options.checkpoint_signals)
    requests: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = [*plan.checkpoint, *plan.stop, plan.pause, plan.resume]
    if install_signals:
        for sig in handled:
            loop.add_signal_handler(sig, requests.put_nowait, sig)
    reporter = None
    try:
        try:
            await backend.start()
        except RunnerError as exc:
            log(str(exc))
            backend.outcome = RunOutcome(exc.exit_code, "start", stop_detail=str(exc))
            return exc.exit_code
        except Exception as exc:
            log(f"the VM failed to start: {exc!r}")
            backend.outcome = RunOutcome(EXIT_VM_START_FAILED, "start", stop_detail=repr(exc))
            return EXIT_VM_START_FAILED
        reporter = _usage_reporter(backend, options.chirp_interval)
        # A signal that arrived while the VM was starting is handled now, below.
        deadline = None if options.timeout is None else \
            loop.time() + max(0.0, options.timeout - backend.elapsed_before)
        periodic = options.checkpoint_every
        next_periodic = None if periodic is None else loop.time() + periodic
        paused = False
        start_deadline = None
        if options.start_timeout is not None and not backend.streams.started.is_set():
            start_deadline = loop.time() + options.start_timeout
        started_at: float | None = None
        run_deadline: float | None = None
        while True:
            if backend.streams.started.is_set():
                start_deadline = None
                if started_at is None:
                    started_at = loop.time()
                    if options.run_for is not None:
                        run_deadline = started_at + options.run_for
            waits: list[float] = [t for t in (deadline, next_periodic, start_deadline,
                                              run_deadline) if t is not None]
            timeout = max(0.0, min(waits) - loop.time()) if waits else None
            get_sig = asyncio.ensure_future(requests.get())
            gone = asyncio.ensure_future(backend.exited.wait())
            started = asyncio.ensure_future(backend.streams.started.wait())
            waiting = {get_sig, gone} if started_at is not None else {get_sig, gone, started}
            done, _ = await asyncio.wait(waiting, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            for future in (get_sig, gone, started):
                if future not in done:
                    future.cancel()
            if backend.exited.is_set():
                break
            now = loop.time()
            if get_sig in done:
                sig = get_sig.result()
                if sig in plan.checkpoint:
                    if backend.streams.finished.is_set():
                        log(f"{sig.name}: the job has ended; letting the VM power off")
                        continue
                    log(f"{sig.name}: checkpointing the VM")
                    paused = False
                    try:
                        await backend.checkpoint(leave=True)
                    except RunnerError:
                        if backend.exited.is_set() and backend.streams.finished.is_set():
                            break  # the job ended and the VM powered off meanwhile
                        raise
                    if backend.exited.is_set() and backend.streams.finished.is_set():
                        break  # nothing was saved: the job had ended (see checkpoint())
                    if backend.checkpoint_failure is not None:
                        # The VM is stopped, the work directory holds the previous
                        # checkpoint (or none): running again resumes it (or starts afresh).
                        log("exiting without a new checkpoint (see above)")
                    else:
                        log("checkpoint published; exiting")
                    return options.checkpoint_exit_code
                if sig in plan.stop:
                    log(f"{sig.name}: stopping the VM without a checkpoint")
                    await backend.poweroff()
                    return 128 + int(sig)
                if sig == plan.pause and not paused:
                    await backend.pause()
                    paused = True
                    log("VM paused (SIGCONT resumes it)")
                elif sig == plan.resume and paused:
                    await backend.unpause()
                    paused = False
                    log("VM resumed")
                continue
            if started in done:
                continue  # the job started: its run_for deadline is set at the loop's top
            if start_deadline is not None and now >= start_deadline and not paused:
                log(f"the job did not start within {options.start_timeout:g}s of boot; "
                    "stopping the VM (see console.log)")
                await backend.poweroff()
                backend.outcome = RunOutcome(EXIT_VM_START_FAILED, backend.stop_reason,
                                             timed_out="start")
                return EXIT_VM_START_FAILED
            if deadline is not None and now >= deadline:
                log(f"the job did not finish within {options.timeout:g}s; stopping the VM")
                await backend.poweroff()
                backend.outcome = RunOutcome(EXIT_JOB_TIMEOUT, backend.stop_reason,
                                             timed_out="run")
                return EXIT_JOB_TIMEOUT
            if run_deadline is not None and now >= run_deadline and not paused \
                    and not backend.streams.finished.is_set():
                assert started_at is not None
                ran = now - started_at
                log(f"the job has run for {ran:.0f}s; shutting the VM down "
                    "(ACPI power button)")
                clean = await backend.shutdown(options.shutdown_grace)
                log("the guest powered off" if clean else
                    f"the guest did not power off within {options.shutdown_grace:g}s of the "
                    "power button; the VM was stopped")
                backend.outcome = RunOutcome(0, backend.stop_reason, ran_for=ran,
                                             clean_shutdown=clean)
                final = await backend.finish(0)
                return 0 if final is None else final
            if next_periodic is not None and now >= next_periodic:
                assert periodic is not None
                if not paused and not backend.streams.finished.is_set():
                    leave = options.exit_after_checkpoint
                    try:
                        await backend.checkpoint(leave=leave)
                    except RunnerError:
                        if not backend.exited.is_set():
                            raise
                    if leave and not backend.streams.finished.is_set() and (
                            backend.checkpointed or backend.checkpoint_failure is not None):
                        log("periodic checkpoint published; exiting (--exit-after-checkpoint)"
                            if backend.checkpoint_failure is None else
                            "exiting without a new checkpoint (see above)")
                        return options.checkpoint_exit_code
                    if backend.exited.is_set():
                        break
                next_periodic = loop.time() + periodic
        report = backend.streams.report
        status = job_exit_status(report)
        outcome = RunOutcome(status, backend.stop_reason,
                             timed_out="job" if report.timed_out else None)
        if report.finished is None:
            if backend.vm_error and not report.started:
                log(f"the VM failed to start: {backend.vm_error}")
                status = EXIT_VM_START_FAILED
                outcome = RunOutcome(status, "start", stop_detail=backend.vm_error)
            else:
                outcome.stop_detail = backend.vm_error or ""
                log(f"the VM stopped without reporting a job status: {outcome.describe()}")
        backend.outcome = outcome
        final = await backend.finish(status)
        return status if final is None else final
    finally:
        if reporter is not None:
            reporter.stop()
        if install_signals:
            for sig in handled:
                loop.remove_signal_handler(sig)
                if ignore_after and (sig in plan.checkpoint or sig == plan.pause) and \
                        sig != signal.SIGINT:
                    signal.signal(sig, signal.SIG_IGN)
        await backend.close()


def check_workdir(workdir: Path, vmx: Path) -> None:
    """Refuse a work directory that holds the image: its garbage collection deletes disks."""
    work = workdir.resolve()
    image_dir = vmx.resolve().parent
    if image_dir == work:  # collection only looks at the work directory's own entries
        raise RunnerError(f"{workdir}: the work directory must not contain the image "
                          f"({vmx}); choose a separate --workdir", EXIT_USAGE)


def run_backend(factory: Callable[[RunOptions, JobStreams], Backend], options: RunOptions,
                known_events: list[dict[str, Any]] | None = None) -> int:
    """Synchronous entry: build the streams and backend, drive them to an exit status."""

    async def main() -> int:
        check_workdir(options.workdir, options.vmx)
        options.workdir.mkdir(parents=True, exist_ok=True)
        # One runner per work directory; the lock goes away with the process, even on SIGKILL.
        lock = open(options.workdir / LOCK, "a")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunnerError(f"{options.workdir}: another runner is using this work directory",
                              EXIT_VM_START_FAILED) from None
        streams = JobStreams(options.workdir, quiet=options.quiet, known_events=known_events)
        try:
            backend = factory(options, streams)
            return await drive(backend, options, ignore_after=True)
        finally:
            streams.close()
            lock.close()

    try:
        return asyncio.run(main())
    except RunnerError as exc:
        log(str(exc))
        return exc.exit_code
