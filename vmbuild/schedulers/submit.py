"""Write what a scheduler needs to run an image (and optionally submit it)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbuild.runner.bundle import write_bundle
from vmbuild.schedulers.condor import _find_vmx, render_submit
from vmbuild.schedulers.image import SchedulerError, image_facts
from vmbuild.schedulers.options import SubmitOptions
from vmbuild.schedulers.slurm import render_sbatch

Scheduler = Literal["condor", "slurm"]
SCHEDULERS: tuple[Scheduler, ...] = ("condor", "slurm")


def write_submission(vmx: str | Path, scheduler: Scheduler, out_dir: str | Path,
                     options: SubmitOptions | None = None, *,
                     bundle: bool = True) -> list[Path]:
    """Write ``OUT_DIR/<name>.sub`` (condor) or ``OUT_DIR/<name>.sbatch`` (slurm), plus the
    runner bundle (``options.bundle``) when ``bundle`` and no ``options.runner_command``
    replaces it. The bundle is always writable (vmbuild.runner.bundle ships with vmbuild), so
    a failure to write it is an error, never a quietly missing file. Returns the files
    written, the submit file first."""
    if scheduler not in SCHEDULERS:
        raise SchedulerError(f"scheduler {scheduler!r}: expected condor or slurm")
    options = options or SubmitOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = image_facts(_find_vmx(vmx))
    name = options.job_name or facts.name
    if scheduler == "condor":
        target = out / f"{name}.sub"
        text = render_submit(facts.vmx, options, submit_dir=out, facts=facts)
    else:
        target = out / f"{name}.sbatch"
        text = render_sbatch(facts.vmx, options, script_dir=out, facts=facts)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    if scheduler == "slurm":
        tmp.chmod(0o755)
    tmp.replace(target)
    written = [target]
    bundle_path = Path(options.bundle)
    if not bundle_path.is_absolute():
        bundle_path = out / bundle_path
    if bundle and options.runner_command is None:
        try:
            write_bundle(bundle_path)
        except OSError as exc:
            raise SchedulerError(f"cannot write the runner bundle {bundle_path}: "
                                 f"{exc.strerror or exc}") from exc
        written.append(bundle_path)
    return written


@dataclass(frozen=True)
class SubmitResult:
    command: list[str]
    returncode: int
    output: str


def submit_now(files: Sequence[Path], scheduler: Scheduler) -> SubmitResult:
    """Run condor_submit / sbatch on the submit file (the first of ``files``), in its
    directory. Raises :class:`SchedulerError` when the tool is not installed here."""
    tool = {"condor": "condor_submit", "slurm": "sbatch"}.get(scheduler)
    if tool is None:
        raise SchedulerError(f"scheduler {scheduler!r}: expected condor or slurm")
    binary = shutil.which(tool)
    if binary is None:
        raise SchedulerError(f"{tool} is not installed here; submit {files[0]} on a "
                             "submit node")
    submit_file = Path(files[0]).resolve()
    command = [binary, submit_file.name]
    proc = subprocess.run(command, cwd=submit_file.parent, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    result = SubmitResult(command, proc.returncode, (proc.stdout + proc.stderr).strip())
    if proc.returncode != 0:
        raise SchedulerError(f"{tool} failed ({proc.returncode}): {result.output}")
    return result
