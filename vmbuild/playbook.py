"""Write the Ansible playbook that turns the base into the application image.

Every recipe value that lands in the playbook is tagged `!unsafe`, so Ansible never treats it
as a Jinja template (a `{{ lookup('pipe', ...) }}` in a recipe would otherwise run on the build
host). The job's settings travel as a JSON file copied verbatim, so they never pass through a
shell, a unit file or a template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from vmbuild.recipe import Recipe

GUEST_DIR = Path(__file__).parent / "guest"
GUEST_LIB = "/usr/local/lib/vmbuild"
JOB_CONFIG = "/etc/vmbuild/job.json"
PACKAGES_TASK = "vmbuild: list installed packages"


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
        parent = spec.dest if spec.dest.endswith("/") else str(Path(spec.dest).parent)
        tasks.append(_task(Unsafe(f"files: {spec.src} -> {spec.dest}"),
                           "ansible.builtin.file", {"path": Unsafe(parent), "state": "directory"}))
        tasks.append(_task(Unsafe(f"files: copy {spec.src}"), "ansible.builtin.copy", args))
    return tasks


def _run_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    tasks = []
    for step in recipe.application.run:
        first = step.strip().splitlines()[0] if step.strip() else ""
        title = first if len(first) <= 60 else first[:57] + "..."
        tasks.append(_task(Unsafe("run: " + title), "ansible.builtin.command",
                           {"argv": ["/bin/sh", "-c", Unsafe(step)]}))
    return tasks


def _system_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    g = recipe.guest
    tasks = [
        _task("hostname", "ansible.builtin.copy",
              {"content": Unsafe(g.hostname + "\n"), "dest": "/etc/hostname"}),
        _task("hosts", "ansible.builtin.copy",
              {"content": Unsafe(f"127.0.0.1 localhost\n127.0.1.1 {g.hostname}\n"
                                 "::1 localhost ip6-localhost ip6-loopback\n"),
               "dest": "/etc/hosts"}),
        _task("timezone", "ansible.builtin.file",
              {"src": Unsafe("/usr/share/zoneinfo/" + g.timezone), "dest": "/etc/localtime",
               "state": "link", "force": True}),
        _task("timezone name", "ansible.builtin.copy",
              {"content": Unsafe(g.timezone + "\n"), "dest": "/etc/timezone"}),
        _task("volatile journal (a job VM keeps no logs on its disk)", "ansible.builtin.copy",
              {"content": "[Journal]\nStorage=volatile\n",
               "dest": "/etc/systemd/journald.conf.d/vmbuild.conf"}),
    ]
    tasks.insert(4, _task("journald drop-in directory", "ansible.builtin.file",
                          {"path": "/etc/systemd/journald.conf.d", "state": "directory"}))
    if recipe.job.user != "root":
        tasks.append(_task("job user", "ansible.builtin.user",
                           {"name": Unsafe(recipe.job.user), "system": True,
                            "create_home": True, "shell": "/bin/sh"}))
    return tasks


def _job_service_tasks(recipe: Recipe, staging: Path) -> list[dict[str, Any]]:
    config = staging / "job.json"
    config.write_text(json.dumps(job_config(recipe), indent=2, sort_keys=True) + "\n")
    dropin_lines = ["[Unit]"]
    if recipe.job.network:
        dropin_lines += ["Wants=network-online.target", "After=network-online.target"]
    dropin_lines += ["", "[Service]"]
    if recipe.job.timeout is not None:
        # The wrapper enforces job.timeout itself; this only catches a wedged wrapper.
        dropin_lines.append(f"TimeoutStartSec={int(recipe.job.timeout) + 120}")
    dropin = "\n".join(dropin_lines) + "\n"
    return [
        _task("job service: directories", "ansible.builtin.file",
              {"path": "{{ item }}", "state": "directory", "mode": "0755"},
              loop=[GUEST_LIB, "/etc/vmbuild", "/etc/systemd/system/vmbuild-job.service.d"]),
        _task("job service: wrapper", "ansible.builtin.copy",
              {"src": str(GUEST_DIR / "vmbuild-job"), "dest": f"{GUEST_LIB}/vmbuild-job",
               "mode": "0755"}),
        _task("job service: settings", "ansible.builtin.copy",
              {"src": str(config), "dest": JOB_CONFIG, "mode": "0644"}),
        _task("job service: unit", "ansible.builtin.copy",
              {"src": str(GUEST_DIR / "vmbuild-job.service"),
               "dest": "/etc/systemd/system/vmbuild-job.service", "mode": "0644"}),
        _task("job service: drop-in", "ansible.builtin.copy",
              {"content": dropin, "dest": "/etc/systemd/system/vmbuild-job.service.d/job.conf",
               "mode": "0644"}),
        _task("job service: enable", "ansible.builtin.command",
              {"argv": ["systemctl", "enable", "vmbuild-job.service"]}),
    ]


def _cleanup_tasks(recipe: Recipe) -> list[dict[str, Any]]:
    """Leave nothing from the build behind: keys, build access, logs, caches."""
    tasks = [
        _task(PACKAGES_TASK, "ansible.builtin.command",
              {"argv": ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"]}),
        _task("cleanup: build access off", "ansible.builtin.command",
              {"argv": ["systemctl", "disable", "vmbuild-build-access.service"]}),
        _task("cleanup: build access files", "ansible.builtin.file",
              {"path": "{{ item }}", "state": "absent"},
              loop=[f"{GUEST_LIB}/vmbuild-build-access",
                    "/etc/systemd/system/vmbuild-build-access.service",
                    "/root/.ssh/authorized_keys", "/root/.ansible", "/root/.bash_history",
                    "/var/cache/apt/archives", "/var/lib/apt/lists", "/var/log/journal"]),
        _task("cleanup: host keys", "ansible.builtin.shell",
              {"cmd": "rm -f /etc/ssh/ssh_host_*"}),
        _task("cleanup: no root password", "ansible.builtin.command",
              {"argv": ["usermod", "-p", "*", "root"]}),
        _task("cleanup: logs", "ansible.builtin.shell",
              {"cmd": "find /var/log -type f -exec truncate -s 0 {} +"}),
        _task("cleanup: mark shipped", "ansible.builtin.copy",
              {"content": "built by vmbuild\n", "dest": "/etc/vmbuild/shipped"}),
    ]
    if recipe.guest.ssh:
        tasks.append(_task("ssh: make host keys at boot", "ansible.builtin.copy",
                           {"content": "[Service]\nExecStartPre=/usr/bin/ssh-keygen -A\n",
                            "dest": "/etc/systemd/system/ssh.service.d/vmbuild-keys.conf"}))
        tasks.insert(-1, _task("ssh: drop-in directory", "ansible.builtin.file",
                               {"path": "/etc/systemd/system/ssh.service.d",
                                "state": "directory"}))
    else:
        tasks.append(_task("cleanup: sshd off", "ansible.builtin.command",
                           {"argv": ["systemctl", "disable", "ssh.service"]}))
    tasks.append(_task("cleanup: trim the disk", "ansible.builtin.command",
                       {"argv": ["fstrim", "-av"]}))
    return tasks


def write_playbook(recipe: Recipe, staging: Path) -> Path:
    """Write site.yml (and the files it copies) into `staging`; return its path."""
    staging.mkdir(parents=True, exist_ok=True)
    setup = {
        "name": "vmbuild: application",
        "hosts": "all",
        "gather_facts": False,
        "tasks": [*_system_tasks(recipe), *_files_tasks(recipe, staging), *_run_tasks(recipe)],
    }
    finish = {
        "name": "vmbuild: job service and cleanup",
        "hosts": "all",
        "gather_facts": False,
        "tasks": [*_job_service_tasks(recipe, staging), *_cleanup_tasks(recipe)],
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
