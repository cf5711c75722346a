"""The HTCondor submit description for a VM job: a vanilla-universe job around the runner.

HTCondor removed VMware from its VM universe (9.12, 2022), so the VM runs inside an ordinary
vanilla job whose executable is the runner bundle. What keeps a preempted VM from being lost:

* ``kill_sig`` (SIGUSR1) makes the runner suspend the VM to disk and exit 85;
* ``job_max_vacate_time`` gives that suspend the time it needs before HTCondor's hard kill
  (from :mod:`vmbuild.schedulers.estimate`);
* ``when_to_transfer_output = ON_EXIT_OR_EVICT`` sends the job directory (checkpoint +
  outputs) back on eviction, and HTCondor brings it into the next sandbox;
* ``checkpoint_exit_code = 85`` + ``transfer_checkpoint_files`` keep a checkpoint the runner
  takes and exits with, so the job restarts from it;
* the base image travels in, never back: only the job directory is in the output lists;
  a disk with a transport form (``NAME.vmdk.zst``, written by the build) travels in that
  form, and the runner expands it in the sandbox (:mod:`vmbuild.runner.transport`).

The HTCondor manual presents eviction-time transfer and exit-driven self-checkpointing as
alternatives and calls the first "risky" for large data. Both are kept, because on a real 25.0
pool (tests/test_condor_pool.py) they combine safely: the eviction-time transfer happens only
when the job exits within the vacate time, so a save cut short by the hard kill transfers
nothing and the spool keeps the last ``checkpoint_exit_code`` checkpoint (the job resumes from
it, never from a torn save, never from zero); a save that finishes sends the newer state, which
supersedes it. Without eviction-time transfer an evicted job would lose everything since its
last self-checkpoint; without ``checkpoint_exit_code`` a cut-short save would lose everything.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

from vmbuild import __version__
from vmbuild.runner.vmx import VmxError, load_vmx, vmx_info
from vmbuild.schedulers.image import ImageFacts, SchedulerError, image_facts
from vmbuild.schedulers.options import CHECKPOINT_EXIT_CODE, SubmitOptions

JOB_DIR = "vmbuild.$(Cluster).$(Process)"  # work dir + outputs; per job, stable across restarts
ITEM_VAR = "vmbuild_input"
_SIGNALS = frozenset({"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGQUIT", "SIGINT", "SIGHUP"})


def condor_arguments(argv: Iterable[str]) -> str:
    """Quote ``argv`` in the submit file's new ``arguments`` syntax (``"a 'b c' d"``)."""
    parts = []
    for arg in argv:
        text = arg.replace('"', '""')
        if not text or any(ch.isspace() for ch in text) or "'" in text:
            text = "'" + text.replace("'", "''") + "'"
        parts.append(text)
    return '"' + " ".join(parts) + '"'


def classad_string(text: str) -> str:
    """A ClassAd string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _transfer_name(path: str, what: str) -> str:
    if not path or "," in path or any(ch.isspace() for ch in path):
        raise SchedulerError(f"{what} {path!r}: HTCondor transfer lists cannot hold names with "
                             "commas or white space; rename it")
    return path


def _relative(path: Path, submit_dir: Path) -> str:
    """``path`` as condor_submit (run in ``submit_dir``) should see it: relative when both
    share a directory below the root (the pair can move together), else absolute."""
    target, base = path.resolve(), submit_dir.resolve()
    if os.path.commonpath([target, base]) == target.anchor:
        return str(target)
    return os.path.relpath(target, base)


def vmware_expr(hardware_version: int | None) -> str:
    """A machine whose VMware can run this image: vmrun there, a product that runs x86 guests
    (not Fusion on Apple silicon), and, when the image's ``virtualHW.version`` is known, a
    product version that runs it (VMware refuses a VM newer than it knows). A machine whose
    probe did not say its highest hardware version never matches such an image."""
    terms = ["TARGET.VMBUILD_VMWARE =?= true", "TARGET.VMBUILD_VMWARE_X86 =?= true"]
    if hardware_version is not None:
        terms += ["TARGET.VMBUILD_VMWARE_MAX_HWVERSION =!= undefined",
                  f"TARGET.VMBUILD_VMWARE_MAX_HWVERSION >= {int(hardware_version)}"]
    return "(" + " && ".join(terms) + ")"


def requirements_expr(options: SubmitOptions, hardware_version: int | None = None) -> str:
    """Match only machines whose probe (STARTD_CRON) says they can run the VM.

    ``hardware_version`` is the image's ``virtualHW.version``; it narrows the VMware side
    (see :func:`vmware_expr`). QEMU runs any hardware version the ``.vmx`` may name.
    """
    if options.backend == "qemu":
        hypervisor = "TARGET.VMBUILD_QEMU =?= true"
    elif options.backend == "vmware":
        hypervisor = vmware_expr(hardware_version)
    elif options.backend in (None, "auto"):
        hypervisor = f"(TARGET.VMBUILD_QEMU =?= true || {vmware_expr(hardware_version)})"
    else:
        raise SchedulerError(f"backend {options.backend!r}: expected qemu or vmware")
    terms = [hypervisor]
    if options.require_kvm:
        terms.append("TARGET.VMBUILD_KVM =?= true")
    if options.min_probe_version:
        terms.append(f"versioncmp(TARGET.VMBUILD_RUNNER_VERSION, "
                     f"{classad_string(options.min_probe_version)}) >= 0")
    else:
        terms.append("TARGET.VMBUILD_RUNNER_VERSION =!= undefined")
    return " && ".join(terms)


def runner_argv(facts: ImageFacts, options: SubmitOptions, job_dir: str,
                inputs: Sequence[str]) -> list[str]:
    """The runner's command line inside the sandbox (all paths relative to it)."""
    argv = ["run", facts.vmx.name, "--workdir", f"{job_dir}/work",
            "--output-dir", f"{job_dir}/outputs"]
    if options.backend and options.backend != "auto":
        argv += ["--backend", options.backend]
    for item in inputs:
        argv += ["--input", item]
    for pair in options.job_env:
        argv += ["--env", pair]
    if options.chirp_interval:
        # the first VmbuildGuest* report comes one interval after the VM starts
        argv += ["--chirp-interval", options.chirp_interval]
    if options.checkpoint_every:
        # HTCondor saves a checkpoint only when the job exits with checkpoint_exit_code;
        # it then starts the runner again at once, which resumes from it.
        argv += ["--checkpoint-every", options.checkpoint_every, "--exit-after-checkpoint"]
    argv += list(options.runner_args)
    return argv


def _extra_lines(extra: Iterable[str]) -> list[str]:
    lines = []
    for raw in extra:
        line = raw.strip()
        if "=" not in line or not line.split("=", 1)[0].strip():
            raise SchedulerError(f"extra submit line {raw!r}: expected 'key = value'")
        if line.split("=", 1)[0].strip().lower() == "queue":
            raise SchedulerError("extra submit lines cannot hold 'queue': use --queue/--item")
        lines.append(line)
    return lines


def render_submit(vmx: str | Path, options: SubmitOptions | None = None, *,
                  submit_dir: str | Path | None = None,
                  facts: ImageFacts | None = None) -> str:
    """The submit description for the image at ``vmx`` (its ``.vmx`` or its directory).

    Paths in the file are relative to ``submit_dir`` (default: the current directory), where
    condor_submit is to be run; the runner bundle is expected there as ``options.bundle``.
    """
    options = options or SubmitOptions()
    submit_dir = Path(submit_dir) if submit_dir is not None else Path.cwd()
    facts = facts or image_facts(_find_vmx(vmx))
    if options.kill_sig.upper() not in _SIGNALS:
        raise SchedulerError(f"kill signal {options.kill_sig!r}: the runner checkpoints on "
                             "SIGUSR1, SIGTERM or SIGQUIT")
    if options.queue < 1:
        raise SchedulerError("--queue must be at least 1")
    for image_file in facts.files:
        if image_file.parent != facts.vmx.parent:
            raise SchedulerError(f"{image_file}: HTCondor puts every input file in one directory; "
                                 "keep the image's files beside its .vmx")
    estimate = options.estimate(facts.memory_mib)

    transfer_in = [_transfer_name(_relative(p, submit_dir), "image file") for p in facts.files]
    inputs: list[str] = []
    inputs_bytes = 0
    for given in options.inputs:
        path = Path(given)
        if not path.exists():
            raise SchedulerError(f"input {given}: no such file or directory")
        transfer_in.append(_transfer_name(_relative(path, submit_dir).rstrip("/"), "input"))
        inputs.append(_transfer_name(path.resolve().name, "input"))
        inputs_bytes += _size(path)
    items = [_transfer_name(_relative(Path(item), submit_dir) if Path(item).exists()
                            else item, "item") for item in options.item_inputs]
    if items:
        transfer_in.append(f"$({ITEM_VAR})")
        inputs.append(f"$Fnx({ITEM_VAR})")

    argv = runner_argv(facts, options, JOB_DIR, inputs)
    name = options.job_name or facts.name
    memory = options.memory_request(facts.memory_mib)
    disk = options.disk_request_mib(facts, inputs_bytes)
    cpus = options.request_cpus or facts.cpus

    out: list[str] = []

    def put(key: str, value: object, comment: str | None = None) -> None:
        if comment and options.comments:
            out.extend(f"# {line}" for line in textwrap.wrap(comment, 96))
        out.append(f"{key:<25} = {value}")

    if options.comments:
        out += [
            f"# HTCondor submit description for the VM image {facts.name!r}, written by "
            f"vmbuild {__version__}.",
            f"# Guest: {facts.memory_mib} MiB, {facts.cpus} vCPU; image files "
            f"{facts.size_bytes / 2**20:.0f} MiB.",
            *_transport_note(facts),
            f"# Run condor_submit in this directory (beside {options.bundle}).",
            "",
        ]
    put("universe", "vanilla",
        "The VM runs inside a vanilla job: the runner bundle is the executable.")
    put("executable", options.bundle)
    put("transfer_executable", "true")
    put("arguments", condor_arguments(argv))
    put("+VmbuildImage", classad_string(facts.name))
    out.append("")
    put("kill_sig", options.kill_sig.upper(),
        f"On eviction the runner gets {options.kill_sig.upper()}, suspends the VM to disk and "
        f"exits {CHECKPOINT_EXIT_CODE}.")
    put("job_max_vacate_time", estimate.seconds,
        f"Time between that signal and the hard kill: {estimate.explain()}.")
    out.append("")
    put("should_transfer_files", "YES",
        "The image travels in; only the job directory (checkpoint + outputs) travels back.")
    put("when_to_transfer_output", "ON_EXIT_OR_EVICT",
        "On eviction the suspended VM (job directory) goes back to the schedd's spool and into "
        "the next sandbox. HTCondor sends it only when the runner exits within the vacate "
        "time: a save cut short by the hard kill sends nothing, and the spool keeps the last "
        "checkpoint below (or none). Together the two never resume a torn save.")
    put("transfer_input_files", ", ".join(transfer_in))
    put("transfer_output_files", JOB_DIR)
    put("checkpoint_exit_code", CHECKPOINT_EXIT_CODE,
        "A runner that checkpoints and exits 85 (--checkpoint-every) has its checkpoint kept "
        "in the spool and is restarted from it at once; it is what an eviction falls back on "
        "when its save is cut short.")
    put("transfer_checkpoint_files", JOB_DIR)
    out.append("")
    put("request_cpus", cpus, "Guest resources plus the hypervisor's overhead.")
    put("request_memory", f"{memory}M")
    put("request_disk", f"{disk}M")
    hardware_version = _hardware_version(facts.vmx)
    put("requirements", requirements_expr(options, hardware_version),
        "Machines whose vmbuild probe (STARTD_CRON) found a usable hypervisor"
        + (f" (VMware: one that runs virtualHW.version {hardware_version} x86 guests)."
           if hardware_version is not None and options.backend != "qemu" else "."))
    out.append("")
    put("+WantIOProxy", "true", "Lets the runner report the guest's load with condor_chirp.")
    put("log", f"{name}.$(Cluster).log")
    put("output", f"{name}.$(Cluster).$(Process).out")
    put("error", f"{name}.$(Cluster).$(Process).err")
    extra = _extra_lines(options.extra)
    if extra:
        out.append("")
        if options.comments:
            out.append("# Extra lines given to vmbuild submit.")
        out += extra
    out.append("")
    if items:
        count = f"{options.queue} " if options.queue > 1 else ""
        out.append(f"queue {count}{ITEM_VAR} from (")
        out += [f"    {item}" for item in items]
        out.append(")")
    else:
        out.append(f"queue {options.queue}" if options.queue > 1 else "queue")
    return "\n".join(out) + "\n"


def _transport_note(facts: ImageFacts) -> list[str]:
    """Comment lines on how the disks travel, when some go in their transport form."""
    if not facts.transported:
        return []
    names = ", ".join(p.name for p in facts.transported)
    return [f"# The disk travels zstd-compressed ({names}); the runner expands it to "
            f"{facts.expanded_bytes / 2**20:.0f} MiB in the sandbox."]


def _hardware_version(vmx: Path) -> int | None:
    """The image's ``virtualHW.version`` (None if the ``.vmx`` cannot say)."""
    try:
        return vmx_info(load_vmx(vmx)).hardware_version
    except (OSError, VmxError):
        return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _find_vmx(path: str | Path) -> Path:
    """``path`` itself, or the one ``.vmx`` in the directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.vmx"))
    if len(found) != 1:
        raise SchedulerError(f"{path}: expected exactly one .vmx file, found {len(found)}")
    return found[0]
