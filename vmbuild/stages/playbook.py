"""Write the Ansible playbook that turns the base into the application image.

Every recipe value that lands in the playbook is tagged `!unsafe`, so Ansible never treats it
as a Jinja template (a `{{ lookup('pipe', ...) }}` in a recipe would otherwise run on the build
host). The job's settings travel as a JSON file copied verbatim, so they never pass through a
shell, a unit file or a template.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

from vmbuild.recipe import Recipe
from vmbuild.stages import bootpath, kernel_modules

GUEST_DIR = Path(__file__).parent.parent / "guest"
GUEST_LIB = "/usr/local/lib/vmbuild"
JOB_CONFIG = "/etc/vmbuild/job.json"
PACKAGES_TASK = "vmbuild: list installed packages"
VMWARE_TOOLS_PACKAGE = "open-vm-tools"
# The app stage installs with the base's apt, which mmdebstrap left without package lists
# (and which the seal empties again). No recommends: open-vm-tools recommends ethtool,
# zerofree and fuse3, none of which a job VM's time sync, guest info or power operations
# need. Retries as the base's mmdebstrap uses them: the build's mirror is over the network.
_APT_INSTALL = ("export DEBIAN_FRONTEND=noninteractive; "
                "apt-get -q -o Acquire::Retries=3 update && "
                "apt-get -q -y -o Acquire::Retries=3 --no-install-recommends install {packages}")


class Unsafe(str):
    """A string Ansible must take literally (rendered as `!unsafe '...'`)."""


class _Dumper(yaml.SafeDumper):
    pass


def _represent_unsafe(dumper: yaml.SafeDumper, value: Unsafe) -> yaml.Node:
    return dumper.represent_scalar("!unsafe", str(value), style="'" if "\n" not in value else "|")


_Dumper.add_representer(Unsafe, _represent_unsafe)


def job_config(recipe: Recipe) -> dict[str, Any]:
    """What the in-guest wrapper (guest/vmbuild-job) reads at boot."""
    job = recipe.job
    return {
        "name": recipe.name,
        "command": list(job.command),
        "workdir": job.workdir,
        "user": job.user,
        "environment": dict(job.environment),
        "timeout": job.timeout,
        "network": job.network,
        "outputs": job.outputs,
    }


def _task(name: str, module: str, args: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, module: args, **extra}


def _files_tasks(recipe: Recipe, staging: Path) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for index, spec in enumerate(recipe.application.files):
        # Stage a copy so the build reads a snapshot, not files the user edits meanwhile.
        staged = staging / f"file-{index}"
        if spec.src_path.is_dir():
            shutil.copytree(spec.src_path, staged, symlinks=True)
        else:
            shutil.copy2(spec.src_path, staged)
        src = str(staged) + ("/" if spec.contents else "")
        args: dict[str, Any] = {"src": Unsafe(src), "dest": Unsafe(spec.dest)}
        if spec.mode:
            args["mode"] = Unsafe(spec.mode)
        if spec.owner:
            owner, _, group = spec.owner.partition(":")
            args["owner"] = Unsafe(owner)
            if group:
                args["group"] = Unsafe(group)
        if not spec.src_path.is_dir():  # copy makes missing directories only for a tree
            parent = spec.dest if spec.dest.endswith("/") else str(Path(spec.dest).parent)
            tasks.append(_task(Unsafe(f"files: directory {parent}"), "ansible.builtin.file",
                               {"path": Unsafe(parent), "state": "directory"}))
        tasks.append(_task(Unsafe(f"files: {spec.src} -> {spec.dest}"), "ansible.builtin.copy",
                           args))
    return tasks


def _run_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    tasks = []
    for step in recipe.application.run:
        first = step.strip().splitlines()[0] if step.strip() else ""
        title = first if len(first) <= 60 else first[:57] + "..."
        tasks.append(_task(Unsafe("run: " + title), "ansible.builtin.command",
                           {"argv": ["/bin/sh", "-c", Unsafe(step)]}))
    return tasks


def _add_file(tar: tarfile.TarFile, path: str, content: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(path.lstrip("/"))
    info.size, info.mode, info.mtime = len(content), mode, int(time.time())
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(content))


def _add_link(tar: tarfile.TarFile, path: str, target: str) -> None:
    info = tarfile.TarInfo(path.lstrip("/"))
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, int(time.time())
    info.uname = info.gname = "root"
    tar.addfile(info)


WRAPPER_MODULE = "vmbuild_job"
# PID 1 of a `guest.init: job` image (vmbuild/guest/vmbuild-init); the initramfs starts it
# instead of systemd when it is there.
JOB_INIT = f"{GUEST_LIB}/init"


def wrapper_entry() -> str:
    """What vmbuild-job.service starts: the wrapper's precompiled module, imported."""
    return (f"#!/usr/bin/python3 -IS\n"
            f"# vmbuild: the job wrapper is {WRAPPER_MODULE}.py beside this file (its bytecode\n"
            f"# in __pycache__, written by the seal); vmbuild/guest/vmbuild-job in vmbuild.\n"
            f"import sys\n"
            f"sys.path.insert(0, {GUEST_LIB!r})\n"
            f"import {WRAPPER_MODULE}  # noqa: E402\n"
            f"sys.exit({WRAPPER_MODULE}.main())\n")


def _job_dropin(recipe: Recipe) -> str:
    lines = ["[Unit]"]
    if recipe.job.network:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["", "[Service]"]
    if recipe.job.timeout is not None:
        # The wrapper enforces job.timeout itself; this only catches a wedged wrapper.
        lines.append(f"TimeoutStartSec={int(recipe.job.timeout) + 120}")
    return "\n".join(lines) + "\n"


def write_system_overlay(recipe: Recipe, path: Path) -> None:
    """One tar of every file vmbuild itself puts into the guest, extracted in a single task.

    Under TCG each Ansible task costs seconds of guest Python start-up, so the system files
    (hostname, time zone, journald, the job service and its settings) travel together.
    """
    g = recipe.guest
    hosts = (f"127.0.0.1 localhost\n127.0.1.1 {g.hostname}\n"
             "::1 localhost ip6-localhost ip6-loopback\n")
    with tarfile.open(path, "w") as tar:
        _add_file(tar, "/etc/hostname", (g.hostname + "\n").encode())
        _add_file(tar, "/etc/hosts", hosts.encode())
        _add_file(tar, "/etc/timezone", (g.timezone + "\n").encode())
        _add_link(tar, "/etc/localtime", "/usr/share/zoneinfo/" + g.timezone)
        # A job VM is thrown away after its run: its journal need not survive on the disk.
        _add_file(tar, "/etc/systemd/journald.conf.d/vmbuild.conf",
                  b"[Journal]\nStorage=volatile\n")
        # The wrapper as a module, which the seal byte-compiles, and the unit's entry to it:
        # a job start then does not compile 600 lines of Python under TCG.
        _add_file(tar, f"{GUEST_LIB}/{WRAPPER_MODULE}.py",
                  (GUEST_DIR / "vmbuild-job").read_bytes())
        _add_file(tar, f"{GUEST_LIB}/vmbuild-job", wrapper_entry().encode(), 0o755)
        if recipe.guest.init == "job":
            _add_file(tar, JOB_INIT, (GUEST_DIR / "vmbuild-init").read_bytes(), 0o755)
        _add_file(tar, JOB_CONFIG,
                  (json.dumps(job_config(recipe), indent=2, sort_keys=True) + "\n").encode())
        _add_file(tar, "/etc/systemd/system/vmbuild-job.service",
                  (GUEST_DIR / "vmbuild-job.service").read_bytes())
        _add_file(tar, "/etc/systemd/system/vmbuild-job.service.d/job.conf",
                  _job_dropin(recipe).encode())
        _add_link(tar, "/etc/systemd/system/multi-user.target.wants/vmbuild-job.service",
                  "/etc/systemd/system/vmbuild-job.service")
        for unit in bootpath.JOB_WAITS_FOR:
            _add_file(tar, f"/etc/systemd/system/{unit}.d/vmbuild-job-first.conf",
                      bootpath.job_first_dropin())
        _add_file(tar, bootpath.LEFT_OUT_FILE, bootpath.left_out_file(recipe))
        _add_file(tar, kernel_modules.KEPT_FILE, kernel_modules.kept_file(recipe))
        _add_file(tar, kernel_modules.INITRAMFS_FILE, kernel_modules.initramfs_file())
        _add_file(tar, f"{GUEST_LIB}/vmbuild-initramfs",
                  (GUEST_DIR / "vmbuild-initramfs").read_bytes(), 0o755)


# The system files travel inside a shell script that extracts them (the tar follows the
# script's text): Ansible's script module sends a file and runs it without Python in the guest,
# where copying the tar and then extracting it took three Python modules, 4 s each under TCG.
# The script names no recipe value. The tar's bytes start right after the header, at the
# offset the header states (zero-padded, so the header's length does not depend on it).
_INSTALLER_HEADER = """#!/bin/sh
# vmbuild: the system files of this image (host name, time zone, the job service), a tar
# appended to this script (vmbuild/stages/playbook.py); extracted over /.
set -eu
tail -c +{offset} "$0" | tar -x --no-overwrite-dir --no-same-owner -f - -C /
exit 0
"""
_INSTALLER_OFFSET_WIDTH = 8


def write_system_installer(overlay: Path, path: Path) -> None:
    """The system tar as a self-extracting script for Ansible's script module."""
    probe = _INSTALLER_HEADER.format(offset="0" * _INSTALLER_OFFSET_WIDTH)
    offset = str(len(probe.encode()) + 1).zfill(_INSTALLER_OFFSET_WIDTH)
    header = _INSTALLER_HEADER.format(offset=offset).encode()
    path.write_bytes(header + overlay.read_bytes())


def _system_tasks(recipe: Recipe, installer: Path) -> list[dict[str, Any]]:
    tasks = [
        # Through /bin/sh: Ansible's remote temp directory is on /run, which is mounted noexec.
        _task("system: install hostname, time zone and the job service",
              "ansible.builtin.script",
              {"cmd": shlex.quote(str(installer)), "executable": "/bin/sh"}),
    ]
    if recipe.job.user != "root":
        tasks.append(_task("job user", "ansible.builtin.user",
                           {"name": Unsafe(recipe.job.user), "system": True,
                            "create_home": True, "shell": "/bin/sh"}))
    return tasks


def _vmware_tools_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    """open-vm-tools, when the recipe asks for it (``guest.vmware_tools: true``).

    Installed here, in the app stage, rather than with ``guest.packages`` in the base: the
    base cache key is unchanged, so images with and without the tools share one cached base,
    at the price of an ``apt-get update`` in the guest (about half a minute under TCG).
    Nothing needs to keep the tools quiet outside VMware: Debian's open-vm-tools.service and
    vgauth.service carry ``ConditionVirtualization=vmware``, so under QEMU (the validation
    boot, the QEMU runner backend) systemd skips them and the job runs as without them.
    """
    if not recipe.guest.vmware_tools:
        return []
    return [_task(f"guest: install {VMWARE_TOOLS_PACKAGE} (its services start only under "
                  "VMware)", "ansible.builtin.command",
                  {"argv": ["/bin/sh", "-c",
                            _APT_INSTALL.format(packages=VMWARE_TOOLS_PACKAGE)]})]


def _finish_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    """Record what is installed, then seal: no keys, no build access, no logs."""
    # Through /bin/sh: Ansible's remote temp directory is on /run, which is mounted noexec.
    seal: dict[str, Any] = {"cmd": shlex.quote(str(GUEST_DIR / "vmbuild-seal")),
                            "executable": "/bin/sh"}
    if recipe.guest.ssh:
        seal["cmd"] += " --keep-ssh"
    return [
        # raw: a command with no recipe value, run without Python in the guest (4 s saved).
        _task(PACKAGES_TASK, "ansible.builtin.raw",
              "dpkg-query -W -f '${Package}\\t${Version}\\n'"),
        _task("seal: remove build keys and access, lock root, clean, trim",
              "ansible.builtin.script", seal),
    ]


def write_playbook(recipe: Recipe, staging: Path) -> Path:
    """Write site.yml (and the files it copies) into `staging`; return its path."""
    staging.mkdir(parents=True, exist_ok=True)
    overlay, installer = staging / "system.tar", staging / "system.sh"
    write_system_overlay(recipe, overlay)
    write_system_installer(overlay, installer)
    setup = {
        "name": "vmbuild: application",
        "hosts": "all",
        "gather_facts": False,
        # The tools come before files and run: steps, so those may use them.
        "tasks": [*_system_tasks(recipe, installer), *_vmware_tools_tasks(recipe),
                  *_files_tasks(recipe, staging), *_run_tasks(recipe)],
    }
    finish = {
        "name": "vmbuild: seal",
        "hosts": "all",
        "gather_facts": False,
        "tasks": _finish_tasks(recipe),
    }
    plays: list[dict[str, Any]] = [setup]
    if recipe.application.playbook is not None:
        user_dir = staging / "user-playbook"
        shutil.copytree(recipe.application.playbook.parent, user_dir, symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "*.vmdk", "*.qcow2", "*.raw"))
        plays.append({"import_playbook": str(user_dir / recipe.application.playbook.name)})
    plays.append(finish)
    path = staging / "site.yml"
    path.write_text(yaml.dump(plays, Dumper=_Dumper, sort_keys=False, width=1000))
    return path
