"""`vmbuild submit` and `vmbuild probe`: argument handling only (the work is in
:mod:`vmbuild.schedulers`). The main CLI adds them with ``register(app)``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from vmbuild.errors import VmbuildError


def _fail(exc: VmbuildError) -> NoReturn:
    print(f"vmbuild: error: {exc}", file=sys.stderr, flush=True)
    raise typer.Exit(exc.exit_code)


def submit(
    image: Annotated[Path, typer.Argument(help="The image's .vmx file (or its directory).")],
    scheduler: Annotated[str, typer.Option(
        "--scheduler", "-s", help="condor (HTCondor submit file) or slurm (sbatch script).")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory for the submit file and the runner bundle.")],
    queue: Annotated[int, typer.Option(
        help="HTCondor: jobs to queue (per --item when items are given).")] = 1,
    item: Annotated[list[str] | None, typer.Option(
        "--item", help="HTCondor: one job per item (a file or directory), given to the job "
                       "as an extra --input. Repeat.")] = None,
    inputs: Annotated[list[Path] | None, typer.Option(
        "--input", help="A file or directory every job gets (runner --input). Repeat.")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="KEY=VALUE for the job's environment in the guest (runner --env). "
                      "Repeat.")] = None,
    chirp_interval: Annotated[str | None, typer.Option(
        help="HTCondor: how often the runner puts the VM's CPU and memory use into the job "
             "ad (runner --chirp-interval, e.g. 30s) [default: the runner's, 60s].")] = None,
    extra: Annotated[list[str] | None, typer.Option(
        "--extra", help="An extra line: 'key = value' (submit file) or 'key=value' (#SBATCH "
                        "option). Repeat.")] = None,
    now: Annotated[bool, typer.Option(
        "--now", help="Also submit with condor_submit / sbatch (when installed here).")] = False,
    write_speed: Annotated[float, typer.Option(
        help="Disk write speed on execute nodes, MiB/s (sizes the suspend time).")] = 100.0,
    measured_suspend: Annotated[float | None, typer.Option(
        help="A suspend time measured on real nodes, seconds (the estimate never goes "
             "below it).")] = None,
    margin: Annotated[float, typer.Option(help="Safety factor on the suspend time.")] = 2.0,
    min_suspend: Annotated[int, typer.Option(
        help="Never allow less than this many seconds to suspend.")] = 60,
    kill_sig: Annotated[str, typer.Option(help="HTCondor: the soft-kill signal.")] = "SIGUSR1",
    backend: Annotated[str | None, typer.Option(
        help="Runner backend: qemu or vmware [default: the runner's choice on the node].")
    ] = None,
    require_kvm: Annotated[bool, typer.Option(
        help="HTCondor: only machines where KVM really works.")] = False,
    checkpoint_every: Annotated[str | None, typer.Option(
        help="Runner --checkpoint-every DURATION.")] = None,
    time: Annotated[str | None, typer.Option(
        "--time", help="Slurm: time limit (e.g. 4:00:00); USR1 comes ahead of it.")] = None,
    partition: Annotated[str | None, typer.Option(help="Slurm: partition.")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm: account.")] = None,
    memory_overhead: Annotated[int, typer.Option(
        help="MiB requested on top of the guest's memory.")] = 512,
    no_bundle: Annotated[bool, typer.Option(
        "--no-bundle", help="Do not write the runner bundle.")] = False,
) -> None:
    """Write what HTCondor or Slurm needs to run IMAGE, preempt it and resume it."""
    from vmbuild.schedulers import SCHEDULERS, SchedulerError, SubmitOptions
    from vmbuild.schedulers.submit import submit_now, write_submission

    try:
        if scheduler not in SCHEDULERS:
            raise SchedulerError(f"--scheduler {scheduler!r}: expected condor or slurm")
        options = SubmitOptions(
            write_mib_s=write_speed, measured_suspend_s=measured_suspend,
            suspend_margin=margin, suspend_floor_s=min_suspend,
            memory_overhead_mib=memory_overhead, inputs=tuple(inputs or ()),
            item_inputs=tuple(item or ()), queue=queue, checkpoint_every=checkpoint_every,
            job_env=tuple(env or ()), chirp_interval=chirp_interval,
            backend=backend, kill_sig=kill_sig, require_kvm=require_kvm,
            extra=tuple(extra or ()), time_limit=time, partition=partition, account=account)
        bad_env = [pair for pair in env or () if "=" not in pair or pair.startswith("=")]
        if bad_env:
            raise SchedulerError(f"--env {bad_env[0]!r}: expected KEY=VALUE")
        if scheduler == "slurm" and (item or queue != 1):
            raise SchedulerError("--queue and --item are for HTCondor; use a job array or "
                                 "several scripts with Slurm")
        files = write_submission(image, scheduler, output, options,
                                 bundle=not no_bundle)
        for path in files:
            print(path)
        if now:
            result = submit_now(files, scheduler)
            print(result.output)
    except VmbuildError as exc:
        _fail(exc)


def probe(
    condor_config: Annotated[bool, typer.Option(
        "--condor-config", help="Print the HTCondor configuration that installs the probe.")
    ] = False,
    runner: Annotated[str, typer.Option(
        help="With --condor-config: the runner bundle's path on the execute node "
             "(or an installed vmbuild command).")] = "/opt/vmbuild/vmbuild-run.pyz",
    no_kvm_check: Annotated[bool, typer.Option(
        "--no-kvm-check", help="Skip the bounded KVM boot test (VMBUILD_KVM = false).")
    ] = False,
) -> None:
    """Print ClassAd lines saying whether this machine can run vmbuild VMs (STARTD_CRON).

    Besides QEMU and KVM: the VMware product (VMBUILD_VMWARE_PRODUCT: workstation, player,
    fusion or none), its version, the highest virtualHW.version it runs
    (VMBUILD_VMWARE_MAX_HWVERSION) and whether it runs x86 guests (VMBUILD_VMWARE_X86; not
    Fusion on Apple silicon). Submit files from `vmbuild submit` compare these with the
    image's virtualHW.version.
    """
    from vmbuild.runner.probe import condor_config_snippet, probe_lines

    if condor_config:
        try:
            sys.stdout.write(condor_config_snippet(runner))
        except ValueError as exc:
            print(f"vmbuild: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        return
    for line in probe_lines(check_kvm=not no_kvm_check):
        print(line)


def register(app: typer.Typer) -> None:
    """Add `submit` and `probe` to the vmbuild app (also add both to cli._COMMANDS)."""
    app.command("submit")(submit)
    app.command("probe")(probe)
