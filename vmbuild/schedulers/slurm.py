"""The Slurm batch script for a VM job: requeue-safe, with time to suspend before a kill.

What keeps a preempted or timed-out VM from being lost:

* ``--signal=B:USR1@N`` sends USR1 to the batch shell N seconds (the suspend estimate)
  before the time limit; the shell forwards it to the runner, which suspends the VM and
  exits 85, and the script requeues the job (``scontrol requeue``);
* the runner runs in the background and the shell ``wait``s for it: a shell runs its traps
  only when its foreground command returns, so a foreground runner would never get the
  forwarded signal in time;
* ``--requeue`` + ``--open-mode=append``: a requeued job (same job id) keeps appending to
  the same output file, and finds its work directory (under ``$HOME``, named by the job id)
  with the checkpoint in it; starting the runner on it resumes the VM;
* on ``scontrol requeue`` or preemption Slurm itself sends SIGTERM and waits ``KillWait``
  (or the partition's ``GraceTime``) before SIGKILL: that wait is the site's setting, and
  must exceed the same estimate (see examples/slurm/README.md).

An image whose disk has a transport form (``NAME.vmdk.zst``) is copied in that form, with its
``.vmx``, into a directory of the job's own beside its work directory (once; a requeued job
reuses it, a finished one removes it), and the runner runs that copy: it expands the disk
into the work directory as under HTCondor. The job then reads a quarter of the bytes from the
shared file system, and an image rebuilt in place meanwhile cannot change under a suspended
job (its checkpoint would no longer match it).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from vmbuild import __version__
from vmbuild.schedulers.image import ImageFacts, SchedulerError, image_facts
from vmbuild.schedulers.options import CHECKPOINT_EXIT_CODE, SubmitOptions

_MAX_SIGNAL_LEAD = 0xFFFF  # Slurm keeps --signal's lead time in 16 bits
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SIGNAL_RE = re.compile(r"^(?:SIG)?(USR1|USR2|TERM|QUIT|INT|HUP)$", re.I)
_SBATCH_KEY_RE = re.compile(r"^-{0,2}([A-Za-z][A-Za-z0-9-]*)(?:\s*=\s*|\s+)?(.*)$")


def slurm_time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise SchedulerError(f"time limit {text!r}: expected minutes, MM:SS, HH:MM:SS or "
                             "DAYS-HH[:MM[:SS]]")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    assert a is not None
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is None:  # minutes
        return a * 60
    if c is None:  # minutes:seconds
        return a * 60 + b
    return a * 3600 + b * 60 + c


def _signal_name(text: str) -> str:
    match = _SIGNAL_RE.match(text.strip())
    if not match:
        raise SchedulerError(f"signal {text!r}: the runner checkpoints on USR1, TERM or QUIT")
    return match.group(1).upper()


def _sbatch_lines(extra: Sequence[str]) -> list[str]:
    lines = []
    for raw in extra:
        match = _SBATCH_KEY_RE.match(raw.strip())
        if not match or "\n" in raw:
            raise SchedulerError(f"extra sbatch option {raw!r}: expected 'key=value' or "
                                 "'--key=value'")
        key, value = match.group(1), match.group(2).strip()
        lines.append(f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}")
    return lines


def runner_command(facts: ImageFacts, options: SubmitOptions, bundle: Path,
                   staged: bool = False) -> list[str]:
    """The fixed part of the runner command, before ``--workdir``; each word shell-quoted.
    ``staged``: the runner runs the job's copy of the image, ``"$image"/NAME.vmx``."""
    if options.runner_command is not None:
        words = list(options.runner_command)
        if not words:
            raise SchedulerError("runner command is empty")
        return [shlex.quote(w) for w in words]
    words = [shlex.quote(w) for w in (options.python, str(bundle), "run")]
    if staged:
        return [*words, '"$image"/' + shlex.quote(facts.vmx.name)]
    return [*words, shlex.quote(str(facts.vmx))]


def _staging(facts: ImageFacts) -> str:
    """Shell lines that copy the image's transport form (its .vmx, the .vmdk.zst disks, the
    NVRAM) into ``$image``, completely or not at all (a ``.part`` directory renamed)."""
    for path in facts.files:
        if path.parent != facts.vmx.parent:
            raise SchedulerError(f"{path}: the job's copy of the image is one directory; keep "
                                 "the image's files beside its .vmx")
    files = " ".join(shlex.quote(str(p)) for p in facts.files)
    return f"""
# The job's own copy of the image, its disk in the compressed transport form; the runner
# expands it into the work directory. Made once (a requeued job reuses it), complete or not
# at all.
image="$work.image"
if [ ! -d "$image" ]; then
    rm -rf -- "$image.part" && mkdir -p -- "$image.part" &&
        cp -- {files} "$image.part"/ &&
        mv -T -- "$image.part" "$image" || exit 1
fi
"""


def render_sbatch(vmx: str | Path, options: SubmitOptions | None = None, *,
                  script_dir: str | Path | None = None,
                  facts: ImageFacts | None = None) -> str:
    """The sbatch script for the image at ``vmx``.

    ``script_dir`` (default: the current directory) holds the runner bundle and receives the
    job's output file and outputs directory; every path in the script is absolute and
    shell-quoted, since sbatch runs a copy of the script from its spool directory.
    """
    options = options or SubmitOptions()
    base = Path(script_dir if script_dir is not None else Path.cwd()).resolve()
    facts = facts or image_facts(vmx)
    estimate = options.estimate(facts.memory_mib)
    lead = estimate.seconds
    if options.signal_lead and lead > _MAX_SIGNAL_LEAD:
        raise SchedulerError(f"suspend estimate {lead} s exceeds Slurm's --signal limit "
                             f"({_MAX_SIGNAL_LEAD} s)")
    signal = _signal_name(options.signal)
    if options.time_limit is not None:
        limit = slurm_time_seconds(options.time_limit)
        if options.signal_lead and limit <= lead:
            raise SchedulerError(f"time limit {options.time_limit} ({limit} s) leaves no run "
                                 f"time before the {lead} s suspend lead; raise --time")
    name = options.job_name or facts.name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SchedulerError(f"job name {name!r}: use letters, digits, '.', '_', '-'")
    bundle = (base / options.bundle) if not Path(options.bundle).is_absolute() \
        else Path(options.bundle)
    memory = options.memory_request(facts.memory_mib)
    cpus = options.request_cpus or facts.cpus
    q = shlex.quote

    out = ["#!/bin/bash"]
    if options.comments:
        out += [
            f"# Slurm batch script for the VM image {facts.name!r}, written by vmbuild "
            f"{__version__}.",
            f"# Guest: {facts.memory_mib} MiB, {facts.cpus} vCPU. Submit with: sbatch "
            f"{name}.sbatch",
            f"# {estimate.explain()}.",
            "# USR1 comes that long before the time limit. For preemption and scontrol requeue,"
            " Slurm",
            "# sends SIGTERM and waits KillWait (or the partition's GraceTime) before SIGKILL: "
            "that must",
            f"# be at least {lead} s too, or the VM's state is lost (a site setting).",
        ]
    out += [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={q(str(base / f'{name}-%j.out'))}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={memory}M",
    ]
    if options.signal_lead:
        out.append(f"#SBATCH --signal=B:{signal}@{lead}")
    if options.time_limit is not None:
        out.append(f"#SBATCH --time={options.time_limit}")
    if options.partition:
        out.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        out.append(f"#SBATCH --account={options.account}")
    out += _sbatch_lines(options.extra)

    work_root = q(options.work_root) if options.work_root \
        else '"${VMBUILD_WORK_ROOT:-$HOME/.vmbuild-work}"'
    outputs = (q(options.output_dir) if options.output_dir
               else q(str(base / f"{name}-outputs")) + '."$job_id"')
    staged = bool(facts.transported) and options.runner_command is None
    argv = runner_command(facts, options, bundle, staged)
    argv += ['--workdir "$work"', '--output-dir "$outputs"']
    if options.backend and options.backend != "auto":
        argv += ["--backend", q(options.backend)]
    for given in options.inputs:
        path = Path(given).expanduser().resolve()
        if not path.exists():
            raise SchedulerError(f"input {given}: no such file or directory")
        argv += ["--input", q(str(path))]
    if options.checkpoint_every:
        argv += ["--checkpoint-every", q(options.checkpoint_every)]
    for pair in options.job_env:
        argv += ["--env", q(pair)]
    argv += [q(a) for a in options.runner_args]
    cleanup = "" if options.keep_work else 'rm -rf -- "$work"'
    if staged:
        cleanup = 'rm -rf -- "$work" "$image"' if cleanup else 'rm -rf -- "$image"'

    out += ["", "set -u", f"""
job_id="${{SLURM_JOB_ID:?run this script with sbatch}}"
work={work_root}/"$job_id"
outputs={outputs}
mkdir -p -- "$work" "$outputs" || exit 1
if [ -n "$(ls -A -- "$work" 2>/dev/null)" ]; then
    echo "vmbuild: job $job_id (restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname):" \\
        "resuming from $work" >&2
else
    echo "vmbuild: job $job_id on $(hostname): starting in $work" >&2
fi
{_staging(facts) if staged else ""}
# The runner runs in the background and this shell waits for it, so that the traps below run
# as soon as a signal arrives; they pass it on to the runner, which suspends the VM and exits
# {CHECKPOINT_EXIT_CODE}. (Slurm's own SIGTERM on requeue may reach the runner twice: directly
# and from here; the runner takes one checkpoint.)
signalled=""
runner_pid=""
forward() {{
    signalled="$1"
    [ -n "$runner_pid" ] && kill -s "$1" "$runner_pid" 2>/dev/null
    return 0
}}
trap 'forward {signal}' {signal}
trap 'forward TERM' TERM
trap 'forward QUIT' QUIT

{" ".join(argv)} &
runner_pid=$!
while :; do
    wait "$runner_pid"
    status=$?
    kill -0 "$runner_pid" 2>/dev/null || break  # a trap interrupted wait: keep waiting
done

if [ "$status" -eq {CHECKPOINT_EXIT_CODE} ]; then
    if [ "$signalled" = {signal} ]; then
        # Checkpointed ahead of the time limit: put the job back in the queue ourselves.
        echo "vmbuild: job $job_id checkpointed before its time limit; requeueing" >&2
        scontrol requeue "$job_id" \\
            || echo "vmbuild: scontrol requeue failed; the checkpoint stays in $work" >&2
    else
        echo "vmbuild: job $job_id checkpointed in $work (signal: ${{signalled:-none}})" >&2
    fi
elif [ "$status" -eq 0 ]; then
    {cleanup or ":"}
fi
exit "$status"
"""]
    return "\n".join(out).rstrip("\n") + "\n"
