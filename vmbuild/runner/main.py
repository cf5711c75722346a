"""Command line of the runner: ``vmbuild run IMAGE.vmx`` / ``python3 vmbuild-run.pyz run ...``.

``main(argv) -> int`` is the whole interface: the typer CLI of vmbuild and the zipapp's
``__main__`` both call it. Standard library only (plus ``qemu.qmp`` for the QEMU backend).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .contract import EXIT_CHECKPOINTED, EXIT_USAGE
from .core import (
    DEFAULT_CHECKPOINT_SIGNALS,
    EXIT_CODES_HELP,
    RunnerError,
    RunOptions,
    log,
    parse_duration,
    parse_signals,
)

DESCRIPTION = """\
Run a vmbuild image like an ordinary batch process: the job's stdout/stderr stream to
stdout, the runner exits with the job's status, and a checkpoint signal saves the whole VM
into the work directory so that the next run on the same work directory resumes it.
"""

RUN_EPILOG = f"""\
{EXIT_CODES_HELP}
signals:
  USR1, TERM, QUIT   (--checkpoint-signals) save the VM, publish the checkpoint, exit 85;
                     SIGINT acts as SIGTERM
  TSTP / CONT        pause / unpause the VM without saving
  KILL               the VM dies with the runner; the next run resumes from the last
                     published checkpoint (or starts fresh if there was none)
"""


def default_backend() -> str:
    """VMware when vmrun is here and can run x86 guests (not Fusion on Apple silicon)."""
    if shutil.which("vmrun"):
        from .probe import can_run_x86_guests

        if can_run_x86_guests():
            return "vmware"
    return "qemu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmbuild-run", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) an image's job",
                         description=DESCRIPTION, epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("vmx", metavar="IMAGE.vmx", type=Path)
    run.add_argument("--workdir", type=Path, default=None,
                     help="where the VM's disk layers and checkpoints live "
                          "(default: ./NAME.vmbuild-run); rerun on it to resume")
    run.add_argument("--backend", choices=("qemu", "vmware"), default=None,
                     help="default: vmware when vmrun is on PATH, else qemu")
    run.add_argument("--input", dest="inputs", action="append", type=Path, default=[],
                     metavar="PATH", nargs="+",
                     help="files or directories for the job (in the guest: $VMBUILD_INPUT)")
    run.add_argument("--arg", dest="args", action="append", default=[], metavar="ARG",
                     help="an extra argument for the job's command (repeatable)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="an environment variable for the job (repeatable)")
    run.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                     help="receives the job's outputs directory after the VM powers off")
    run.add_argument("--output-size", default="1024", metavar="MIB",
                     help="size of the outputs disk in MiB (sparse; default 1024)")
    run.add_argument("--checkpoint-every", default=None, metavar="DURATION",
                     help="also checkpoint periodically (e.g. 30m) while the job runs")
    run.add_argument("--checkpoint-signals", default=",".join(DEFAULT_CHECKPOINT_SIGNALS),
                     metavar="SIGS", help="signals that checkpoint and exit "
                     f"(default {','.join(DEFAULT_CHECKPOINT_SIGNALS)}; '' for none)")
    run.add_argument("--checkpoint-exit-code", type=int, default=EXIT_CHECKPOINTED,
                     metavar="N", help=f"exit status after a checkpoint (default "
                     f"{EXIT_CHECKPOINTED})")
    run.add_argument("--timeout", default=None, metavar="DURATION",
                     help="stop the job after this much run time (summed over resumes); "
                          "exit 91")
    run.add_argument("--start-timeout", default="15m", metavar="DURATION",
                     help="give up (exit 90) when the job has not started this long after "
                          "the VM was started (default 15m; 'none' to wait forever)")
    run.add_argument("--accel", choices=("kvm", "tcg"), default=None,
                     help="QEMU accelerator (default: KVM when a bounded probe shows it works)")
    run.add_argument("--vmware-type", choices=("ws", "player", "fusion"), default=None,
                     help="vmrun -T host type (default: fusion on macOS, else ws)")
    run.add_argument("--exit-after-checkpoint", action="store_true",
                     help="with --checkpoint-every: exit with the checkpoint code after each "
                          "periodic checkpoint (HTCondor's self-checkpointing: it saves the "
                          "checkpoint files and starts the runner again, which resumes)")
    run.add_argument("--on-resume-failure", choices=("restart", "fail"), default="restart",
                     help="VMware: when VMware refuses to resume the checkpoint (e.g. a host "
                          "whose CPU features differ), start the job afresh from the image "
                          "(restart, the default; counted in result.json) or exit 90 keeping "
                          "the checkpoint (fail)")
    run.add_argument("--keep-base", action="store_true",
                     help="keep the image's disk converted to qcow2 (QEMU) and a transport "
                          "form's expansion (NAME.vmdk.zst, both backends) in the work "
                          "directory after a checkpoint or the end (faster local resume; by "
                          "default they are removed, so a scheduler moves only what the job "
                          "wrote)")
    run.add_argument("--console", action="store_true",
                     help="QEMU: show the guest's console (kernel and boot messages) live on "
                          "stderr, as well as in console.log")
    run.add_argument("--chirp-interval", default=None, metavar="DURATION",
                     help="under HTCondor with +WantIOProxy: how often the VM's CPU and "
                          "memory use go into the job ad (VmbuildGuest*; default 60s)")
    run.add_argument("--quiet", action="store_true",
                     help="do not copy the job's output to stdout (it is still in job.log)")
    bundle = sub.add_parser("bundle", help="write the runner as a single-file zipapp")
    bundle.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.pyz")
    return parser


def options_from(ns: argparse.Namespace) -> RunOptions:
    vmx: Path = ns.vmx
    if not vmx.is_file():
        raise RunnerError(f"{vmx}: no such image", EXIT_USAGE)
    env: dict[str, str] = {}
    for item in ns.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunnerError(f"--env {item!r}: expected KEY=VALUE", EXIT_USAGE)
        env[key] = value
    try:
        every = parse_duration(ns.checkpoint_every) if ns.checkpoint_every else None
        timeout = parse_duration(ns.timeout) if ns.timeout else None
        start_timeout = None if ns.start_timeout.lower() in ("", "none") else \
            parse_duration(ns.start_timeout)
        signals = parse_signals(ns.checkpoint_signals)
        output_size = int(ns.output_size)
    except ValueError as exc:
        raise RunnerError(str(exc), EXIT_USAGE) from exc
    chirp_interval = _chirp_interval(ns.chirp_interval)
    workdir = ns.workdir or Path.cwd() / f"{vmx.stem}.vmbuild-run"
    return RunOptions(
        vmx=vmx.resolve(), workdir=Path(os.path.abspath(workdir)),
        inputs=[Path(p) for group in ns.inputs for p in group], args=list(ns.args), env=env,
        output_dir=ns.output_dir.resolve() if ns.output_dir else None,
        output_size_mib=output_size, checkpoint_every=every, checkpoint_signals=signals,
        checkpoint_exit_code=ns.checkpoint_exit_code, timeout=timeout,
        start_timeout=start_timeout, accel=ns.accel,
        vmware_type=ns.vmware_type, quiet=ns.quiet, keep_base=ns.keep_base, console=ns.console,
        exit_after_checkpoint=ns.exit_after_checkpoint,
        on_resume_failure=ns.on_resume_failure, chirp_interval=chirp_interval)


def _chirp_interval(value: str | None) -> float | None:
    """``--chirp-interval`` in seconds (None: the reporter's default)."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise RunnerError(f"--chirp-interval {value!r}: {exc}", EXIT_USAGE) from exc
    if seconds <= 0:
        raise RunnerError(f"--chirp-interval {value!r}: must be positive", EXIT_USAGE)
    return seconds


def run_command(ns: argparse.Namespace) -> int:
    from .core import run_backend

    options = options_from(ns)
    backend = ns.backend or default_backend()
    if backend == "qemu":
        from .qemu import QemuBackend

        return run_backend(QemuBackend, options)
    from .vmware import VmwareBackend

    return run_backend(VmwareBackend, options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if ns.command == "bundle":
            from .bundle import write_bundle

            write_bundle(ns.output)
            log(f"wrote {ns.output}")
            return 0
        return run_command(ns)
    except RunnerError as exc:
        log(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
