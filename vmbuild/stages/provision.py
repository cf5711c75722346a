"""Apply the generated playbook to the guest through ansible-runner, as a stream of events.

Packer runs this module (its shell-local provisioner) once the guest answers SSH, passing the
forwarded address in the environment. Each Ansible event is printed as one marked JSON line;
vmbuild's Packer driver picks those out of Packer's machine-readable output, so the user sees
task names live and a failed task with its name and its stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from vmbuild.stages.packer import EVENT_MARKER
from vmbuild.stages.playbook import PACKAGES_TASK

HOST_KEY_ALIAS = "vmbuild-guest"

#: ansible-playbook, made to die with the process that started it (PR_SET_PDEATHSIG):
#: Packer kills its shell-local step outright when a build is interrupted, and the playbook
#: must not go on provisioning a VM that is being torn down.
TIED_PLAYBOOK = """\
#!{python}
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() == 1:
    sys.exit(130)
os.execv({playbook!r}, [{playbook!r}, *sys.argv[1:]])
"""


def emit(kind: str, message: str, **data: Any) -> None:
    record = {"stage": "provision", "kind": kind, "message": message, "data": data}
    print(EVENT_MARKER + json.dumps(record), flush=True)


def inventory(spec: dict[str, Any], host: str, port: str) -> dict[str, Any]:
    """The one guest, reached with the per-build key, its host key pinned (no TOFU)."""
    ssh_args = " ".join([
        "-o", "StrictHostKeyChecking=yes",
        "-o", shlex.quote("UserKnownHostsFile=" + spec["known_hosts"]),
        "-o", "HostKeyAlias=" + HOST_KEY_ALIAS,
        "-o", "IdentitiesOnly=yes",
    ])
    return {"all": {"hosts": {"guest": {
        "ansible_host": host,
        "ansible_port": int(port),
        "ansible_user": "root",
        "ansible_ssh_private_key_file": spec["ssh_key"],
        "ansible_ssh_common_args": ssh_args,
        "ansible_python_interpreter": "/usr/bin/python3",
    }}}}


class EventHandler:
    """Turns ansible-runner events into vmbuild events; remembers what the build needs."""

    def __init__(self, packages_out: Path) -> None:
        self.packages_out = packages_out
        self.failed: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> bool:
        name = event.get("event", "")
        data = event.get("event_data", {})
        task = data.get("task", "")
        if name == "playbook_on_task_start":
            emit("step", task, task=task)
        elif name == "runner_on_failed" and not data.get("ignore_errors"):
            res = data.get("res", {})
            # Over SSH a script's error text often lands in stdout (pty), not stderr.
            stderr = "\n".join(part for part in ((res.get("stdout") or "").strip(),
                                                   (res.get("stderr") or "").strip()) if part)
            msg = (res.get("msg") or "").strip()
            self.failed.append({"task": task, "stderr": stderr, "msg": msg})
            emit("error", f"task failed: {task}", task=task, stderr=stderr[-4000:],
                 msg=msg[-2000:], rc=res.get("rc"))
        elif name == "runner_on_unreachable":
            msg = (data.get("res", {}).get("msg") or "").strip()
            emit("error", f"guest unreachable during: {task}", task=task, msg=msg)
        elif name == "runner_on_ok" and task == PACKAGES_TASK:
            stdout = data.get("res", {}).get("stdout", "")
            pairs = (line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)
            self.packages_out.write_text(json.dumps(dict(sorted(pairs)), indent=1))
        return True  # keep ansible-runner's own artifact files too (debugging)


def provision(spec_path: Path, host: str, port: str) -> int:
    import ansible_runner  # imported here: the runner zipapp never loads this module

    spec = json.loads(spec_path.read_text())
    private = Path(spec["work_dir"])
    handler = EventHandler(Path(spec["packages_out"]))
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": os.pathsep.join([str(private / "bin"), venv_bin, os.environ.get("PATH", "")]),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PIPELINING": "1",  # one SSH round trip a task: halves provisioning under TCG
        "ANSIBLE_REMOTE_TMP": "/run/vmbuild-ansible",  # tmpfs: gone when the VM powers off
        "ANSIBLE_LOCAL_TEMP": str(private / "ansible-local"),
        "ANSIBLE_SSH_RETRIES": "3",
        "ANSIBLE_TIMEOUT": "60",
    }
    # ansible-playbook runs on its own terminal (ansible-runner's pexpect), out of reach of
    # the signals an interrupted build sends: it is tied to this process instead, and a
    # signal that does reach this process asks ansible-runner to stop it.
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    tied = private / "bin" / "ansible-playbook"  # first on PATH: ansible-runner runs it
    tied.parent.mkdir(exist_ok=True)
    tied.write_text(TIED_PLAYBOOK.format(python=sys.executable,
                                         playbook=str(Path(venv_bin) / "ansible-playbook")))
    tied.chmod(0o755)
    emit("start", "provisioning with Ansible (ansible-runner)")
    result = ansible_runner.run(
        cancel_callback=lambda: bool(stop),
        private_data_dir=str(private),
        playbook=spec["playbook"],
        inventory=inventory(spec, host, port),
        envvars=env,
        event_handler=handler,
        quiet=True,
        json_mode=False,
    )
    if stop:
        emit("error", f"provisioning stopped by {signal.Signals(stop[0]).name}")
        return 130
    if result.rc != 0 or result.status != "successful":
        if not handler.failed:
            emit("error", f"ansible-runner ended {result.status} (rc {result.rc})")
        return 1
    emit("done", "provisioning done")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vmbuild.stages.provision SPEC.json", file=sys.stderr)
        return 2
    host = os.environ.get("VMBUILD_SSH_HOST", "127.0.0.1")
    port = os.environ.get("VMBUILD_SSH_PORT", "")
    if not port.isdigit():
        emit("error", f"Packer did not pass the guest's SSH port (got {port!r})")
        return 2
    return provision(Path(args[0]), host, port)


if __name__ == "__main__":
    sys.exit(main())
