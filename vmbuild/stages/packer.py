"""Drive the external `packer` binary: render the template, validate, build, cancel cleanly.

The template is generated as JSON with the `json` module, never by pasting strings, so no
recipe value can change its structure. Packer's `-machine-readable` output is parsed into
progress events; the provisioning subprocess (vmbuild.stages.provision) reports Ansible's task
events through that same stream, marked with EVENT_MARKER.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild.errors import BuildError, UsageError
from vmbuild.events import Event, Reporter

EVENT_MARKER = "VMBUILD-EVENT "
SOURCE_NAME = "vmbuild"
# How long Packer gets to tear its VM down after an interrupt before it is killed.
CANCEL_GRACE = 60.0


@dataclass(frozen=True)
class PackerVersion:
    major: int
    minor: int
    patch: int

    @property
    def needs_plugins(self) -> bool:
        """Packer 1.7 split the builders into plugins; from 1.10 none are bundled at all."""
        return (self.major, self.minor) >= (1, 7)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class PackerJob:
    """Everything the app-stage Packer run needs, already decided by the plan."""

    name: str
    disk: Path  # qcow2 to boot (an overlay on the cached base)
    output_dir: Path  # must not exist yet; Packer creates it
    disk_size_mib: int
    memory_mib: int
    cpus: int
    firmware: str
    accelerator: str
    ssh_key: Path  # private key; its .pub goes to the guest through fw_cfg
    host_key: Path  # the guest's host key, private, given through fw_cfg
    provision_spec: Path
    console_log: Path
    ovmf: str | None = None
    python: str = sys.executable  # runs vmbuild.stages.provision from Packer's shell-local step


def packer_version(binary: str = "packer") -> PackerVersion:
    try:
        proc = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UsageError("packer is not installed (Debian: apt-get install packer)") from None
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise BuildError(f"cannot read the Packer version: {proc.stdout or proc.stderr}")
    return PackerVersion(*(int(g) for g in match.groups()))


def qemu_opt(value: str) -> str:
    """QEMU splits option values at commas; a literal comma is written twice."""
    return value.replace(",", ",,")


def _builder_settings(job: PackerJob) -> dict[str, Any]:
    qemuargs = [
        ["-fw_cfg", "name=opt/vmbuild/authorized_keys,file="
         + qemu_opt(str(job.ssh_key) + ".pub")],
        ["-fw_cfg", "name=opt/vmbuild/ssh_host_ed25519_key,file=" + qemu_opt(str(job.host_key))],
        ["-serial", "file:" + str(job.console_log)],
    ]
    if job.firmware == "efi" and job.ovmf:
        qemuargs.append(["-bios", job.ovmf])
    return {
        "vm_name": f"{job.name}.qcow2",
        "iso_url": str(job.disk),
        "iso_checksum": "none",
        "disk_image": True,
        "use_backing_file": False,
        "format": "qcow2",
        "skip_compaction": True,
        "disk_size": f"{job.disk_size_mib}M",
        "disk_interface": "virtio-scsi",
        "disk_discard": "unmap",
        "net_device": "virtio-net",
        "accelerator": job.accelerator,
        "memory": job.memory_mib,
        "cpus": job.cpus,
        "headless": True,
        "output_directory": str(job.output_dir),
        "communicator": "ssh",
        "ssh_username": "root",
        "ssh_private_key_file": str(job.ssh_key),
        "ssh_timeout": "8m",
        "boot_wait": "1s",
        "shutdown_command": "systemctl poweroff",
        "shutdown_timeout": "10m",
        "qemuargs": qemuargs,
    }


def _provisioner(job: PackerJob, host: str, port: str) -> dict[str, Any]:
    """Packer hands the guest's forwarded SSH address to stages.provision (ansible-runner)."""
    return {
        "environment_vars": [
            f"VMBUILD_SSH_HOST={host}",
            f"VMBUILD_SSH_PORT={port}",
            f"VMBUILD_PROVISION_SPEC={job.provision_spec}",
            f"VMBUILD_PYTHON={job.python}",
        ],
        "inline": ['exec "$VMBUILD_PYTHON" -m vmbuild.stages.provision "$VMBUILD_PROVISION_SPEC"'],
    }


def render_template(job: PackerJob, version: PackerVersion) -> tuple[str, dict[str, Any]]:
    """Return (file name, template). Legacy JSON for Packer < 1.7, HCL2-as-JSON after.

    Packer 1.6.6 reads `*.pkr.json` as HCL2, so the legacy template must be named `*.json`.
    """
    builder = _builder_settings(job)
    if not version.needs_plugins:
        legacy = {
            "builders": [{"type": "qemu", "name": SOURCE_NAME, **builder}],
            "provisioners": [{"type": "shell-local",
                              **_provisioner(job, "{{ build `Host` }}", "{{ build `Port` }}")}],
        }
        return "template.json", legacy
    hcl = {
        "packer": {
            "required_version": ">= 1.7.0",
            "required_plugins": {
                "qemu": {"version": ">= 1.0.0", "source": "github.com/hashicorp/qemu"},
            },
        },
        "source": {"qemu": {SOURCE_NAME: builder}},
        "build": {
            "sources": [f"source.qemu.{SOURCE_NAME}"],
            "provisioner": [{"shell-local": _provisioner(job, "${build.Host}",
                                                         "${build.Port}")}],
        },
    }
    return "template.pkr.json", hcl


def write_template(job: PackerJob, version: PackerVersion, directory: Path) -> Path:
    name, template = render_template(job, version)
    path = directory / name
    path.write_text(json.dumps(template, indent=2, sort_keys=True) + "\n")
    return path


def parse_machine_line(line: str) -> tuple[str, str, list[str]] | None:
    """Split one `-machine-readable` line into (target, type, data), undoing Packer's escapes."""
    parts = line.rstrip("\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = [p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")
            for p in parts[3:]]
    return parts[1], parts[2], data


def _ui_event(kind: str, text: str) -> Event | None:
    for raw in text.splitlines():
        marker = raw.find(EVENT_MARKER)
        if marker >= 0:
            try:
                payload = json.loads(raw[marker + len(EVENT_MARKER):])
            except json.JSONDecodeError:
                continue
            return Event(payload.get("stage", "provision"), payload.get("kind", "step"),
                         payload.get("message", ""), payload.get("data", {}))
    message = re.sub(r"^(==> |    )?" + SOURCE_NAME + r"( \([\w-]+\))?: ", "", text.strip())
    if not message:
        return None
    if kind == "error":
        return Event("packer", "error", message)
    return Event("packer", "step", message)


class PackerRun:
    """One `packer build`, cancellable from another thread or a signal handler."""

    def __init__(self, template: Path, report: Reporter, *, binary: str = "packer") -> None:
        self.template = template
        self.report = report
        self.binary = binary
        self.proc: subprocess.Popen[str] | None = None
        self.errors: list[str] = []
        self._cancelled = threading.Event()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "CHECKPOINT_DISABLE": "1",  # no update check: build hosts are often offline
            "PACKER_CACHE_DIR": str(self.template.parent / "packer_cache"),
            "PACKER_NO_COLOR": "1",
        })
        return env

    def validate(self) -> None:
        proc = subprocess.run([self.binary, "validate", self.template.name],
                              cwd=self.template.parent, env=self.environment(),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BuildError("packer validate rejected the generated template:\n"
                             + (proc.stdout + proc.stderr).strip())

    def cancel(self) -> None:
        """Ask Packer to stop the way Ctrl-C would; it then stops QEMU and deletes its output."""
        self._cancelled.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def build(self, on_event: Callable[[Event], None] | None = None) -> None:
        argv = [self.binary, "build", "-machine-readable", "-color=false",
                "-on-error=cleanup", self.template.name]
        # Its own session: a terminal's Ctrl-C reaches vmbuild, which then cancels Packer
        # exactly once, instead of both racing to clean up.
        self.proc = subprocess.Popen(argv, cwd=self.template.parent, env=self.environment(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._handle(line, on_event or self.report)
            status = self.proc.wait()
        except BaseException:
            self.cancel()
            self._reap()
            raise
        if self.cancelled:
            raise BuildError("the build was cancelled; Packer stopped its VM")
        if status != 0:
            detail = "\n  ".join(self.errors[-8:]) or f"exit status {status}"
            raise BuildError("packer build failed:\n  " + detail)

    def _reap(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=CANCEL_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _handle(self, line: str, emit: Callable[[Event], None]) -> None:
        parsed = parse_machine_line(line)
        if parsed is None:
            return
        _target, kind, data = parsed
        if kind == "ui" and len(data) >= 2:
            event = _ui_event(data[0], data[1])
            if event is not None:
                if event.kind == "error":
                    self.errors.append(event.message)
                emit(event)
        elif kind == "error" and data:
            self.errors.append(data[0])


def reference_job() -> PackerJob:
    """A job with placeholder paths, rendered into packer/ as readable reference templates."""
    build = Path("/BUILD")
    return PackerJob(
        name="hello", disk=build / "app-input.qcow2", output_dir=build / "packer-output",
        disk_size_mib=4096, memory_mib=1024, cpus=2, firmware="bios", accelerator="tcg",
        ssh_key=build / "keys/build_key", host_key=build / "keys/host_key",
        provision_spec=build / "provision.json", console_log=build / "build-console.log",
        python="/usr/bin/python3")


def write_reference_templates(directory: Path) -> list[Path]:
    """Regenerate packer/*.json (a test checks they match what builds really use)."""
    written = []
    for version in (PackerVersion(1, 6, 6), PackerVersion(1, 11, 0)):
        name, template = render_template(reference_job(), version)
        path = directory / name.replace("template", "app-stage")
        path.write_text(json.dumps(template, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_reference_templates(Path(sys.argv[1] if len(sys.argv) > 1
                                                       else "packer")):
        print(written_path)
