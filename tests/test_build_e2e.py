"""End to end: real mmdebstrap, Packer, Ansible and QEMU builds and boots (marked slow).

Boots are deliberate: the hello image is built once for the session (with its validation
boot), booted once more with plain QEMU, and one more image carries both the hostile-values
check and the failing-job check in a single boot.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO, built_image, run_vmbuild
from tests.runner_harness import processes_mentioning

pytestmark = pytest.mark.slow


def test_hello_build_publishes_a_complete_image(hello_vmx: Path) -> None:
    out = hello_vmx.parent
    assert sorted(p.name for p in out.iterdir()) == ["hello.vmdk", "hello.vmdk.zst", "hello.vmx",
                                                     "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validated"] is True
    assert manifest["packer_version"]
    assert manifest["packages"]["systemd"]  # versions recorded from inside the guest
    for name in ("hello.vmdk", "hello.vmdk.zst", "hello.vmx"):
        assert manifest["files"][name]["size"] == (out / name).stat().st_size
    assert manifest["sizes"]["vmdk"] == (out / "hello.vmdk").stat().st_size
    # The transport form is the same disk, compressed (what `vmbuild submit` ships).
    expanded = subprocess.run(["zstd", "-dc", str(out / "hello.vmdk.zst")], check=True,
                              capture_output=True).stdout
    assert expanded == (out / "hello.vmdk").read_bytes()
    assert manifest["sizes"]["vmdk_zst"] < manifest["sizes"]["vmdk"] / 2
    # Nothing half-written is left beside the output directory.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".vmbuild-")]


def test_plain_qemu_boot_runs_the_job_and_powers_off(hello_vmx: Path, tmp_path: Path) -> None:
    """No vmbuild code involved: QEMU, the VMDK, pvscsi as the .vmx says, serial files."""
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b",
                    str(hello_vmx.with_suffix(".vmdk")), str(layer)], check=True)
    logs = [tmp_path / n for n in ("console.log", "job.log", "control.log")]
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "512",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-drive", f"file={layer},format=qcow2,if=none,id=d0",
            "-device", "pvscsi,id=scsi0", "-device", "scsi-hd,bus=scsi0.0,drive=d0"]
    for i, log in enumerate(logs):
        argv += ["-chardev", f"file,id=s{i},path={log}", "-serial", f"chardev:s{i}"]
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "hello from the guest" in logs[1].read_text()
    events = [json.loads(line) for line in logs[2].read_text().splitlines() if line.strip()]
    assert events[0]["event"] == "started"
    assert events[-1]["event"] == "exited" and events[-1]["status"] == 0
    boot = next(e for e in events if e["event"] == "boot")  # where the boot's time went
    assert 0 < boot["kernel"] < boot["userspace_start"] < events[0]["uptime"]


def _debugfs(raw: Path, offset: int, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, f"{raw}?offset={offset}"],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def test_shipped_image_holds_no_build_secrets(hello_vmx: Path, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(hello_vmx.with_suffix(".vmdk")),
                    str(raw)], check=True)
    offset = 1024 * 1024  # the BIOS layout's root partition
    assert "authorized_keys" not in _debugfs(raw, offset, "ls -l /root/.ssh")
    assert "ssh_host_" not in _debugfs(raw, offset, "ls /etc/ssh")
    lib = _debugfs(raw, offset, "ls /usr/local/lib/vmbuild")
    assert "vmbuild-build-access" not in lib
    assert "init" in lib.split()  # hello is built with guest.init: job (vmbuild-init)
    shadow = _debugfs(raw, offset, "cat /etc/shadow")
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    assert root.split(":")[1] in ("*", "!", "!*"), "root must have no password hash"
    assert "ssh.service" not in _debugfs(raw, offset,
                                         "ls /etc/systemd/system/multi-user.target.wants")
    # The lean boot path (stages/bootpath.py): what the manifest lists as left out is masked
    # on the disk, and nothing pulled in the full perl (usrmerge did, before /usr was born
    # merged).
    manifest = json.loads((hello_vmx.parent / "manifest.json").read_text())
    left_out = [e["unit"] for e in manifest["guest"]["left_out"]]
    assert "getty.target" in left_out and "systemd-getty-generator" in left_out
    for unit, directory in (("getty.target", "system"), ("timers.target", "system"),
                            ("systemd-networkd.service", "system"),  # hello has no network
                            ("systemd-udevd.service", "system"),  # nor VMware Tools
                            ("systemd-logind.service", "system"),  # the wrapper has the button
                            ("systemd-getty-generator", "system-generators")):
        link = _debugfs(raw, offset, f"stat /etc/systemd/{directory}/{unit}")
        assert "Type: symlink" in link and '"/dev/null"' in link, (unit, link)
    assert not {"perl", "usrmerge"} & manifest["packages"].keys()
    # D-Bus is left for its socket to start (no vendor link pulls it in at boot); the
    # modules-load service is masked (hello lists no modules).
    assert "dbus.service" not in _debugfs(raw, offset,
                                          "ls /usr/lib/systemd/system/multi-user.target.wants")
    unit = "systemd-modules-load.service"
    assert '"/dev/null"' in _debugfs(raw, offset, f"stat /etc/systemd/system/{unit}"), unit
    # Kernel modules (stages/kernel_modules.py): the virtual hardware's drivers and what they
    # need stay, the rest of the tree (here btrfs, the Xen drivers) is gone, and depmod knows.
    kver = next(n for n in _debugfs(raw, offset, "ls /usr/lib/modules").split()
                if re.fullmatch(r"\d+\.\d+\.\d+-.+", n))
    kernel = f"/usr/lib/modules/{kver}/kernel"
    assert "vmw_pvscsi.ko" in _debugfs(raw, offset, f"ls {kernel}/drivers/scsi")
    assert "scsi_mod.ko" in _debugfs(raw, offset, f"ls {kernel}/drivers/scsi")
    assert "hwdb.bin" not in _debugfs(raw, offset, "ls /usr/lib/udev")
    assert "button.ko" in _debugfs(raw, offset, f"ls {kernel}/drivers/acpi")  # power button
    filesystems = _debugfs(raw, offset, f"ls {kernel}/fs").split()
    assert "fuse" in filesystems and "btrfs" not in filesystems
    dep = _debugfs(raw, offset, f"cat /usr/lib/modules/{kver}/modules.dep")
    assert "vmw_pvscsi.ko" in dep and "btrfs" not in dep and "xen" not in dep
    assert [g for g in manifest["guest"]["modules_kept"] if "vmw_pvscsi" in g["modules"]]
    phases = manifest["validation"]["boot_phases"]
    assert 0 < phases["kernel"] < phases["to_job"]


def test_changed_application_reuses_the_cached_base(hello_vmx: Path, tmp_path: Path) -> None:
    project = tmp_path / "hello"
    shutil.copytree(EXAMPLES / "hello", project)
    shutil.copy(REPO / "recipes" / "debian-12-minimal.yaml", project / "base.yaml")
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("extends: debian-12-minimal",
                                                 "extends: base.yaml"))
    main = project / "app" / "main.py"
    main.write_text(main.read_text() + '\nprint("changed application")\n')
    proc = run_vmbuild(recipe, "-o", tmp_path / "out", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "reusing cached base image" in proc.stderr
    assert str(tmp_path / "out" / "hello.vmx") in proc.stdout


HOSTILE = "it's \"quoted\" $HOME %h %% ; rm -rf / ; `id` {{ 7*7 }} \\n end\nsecond line"


def test_hostile_values_reach_the_guest_verbatim_and_failure_is_reported(
        images_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "quirky"
    (project / "app").mkdir(parents=True)
    (project / "app" / "show.py").write_text(
        "import json, os, sys\n"
        "print('VALUES ' + json.dumps({'argv': sys.argv[1:], 'env': os.environ['QUIRK'],"
        " 'cwd': os.getcwd()}))\n"
        "sys.exit(3)\n")
    recipe = {
        "version": 1, "name": "quirky", "extends": "debian-12-minimal",
        "application": {"files": [{"src": "app/", "dest": "/opt/quirky %h/"}]},
        "job": {"command": ["/usr/bin/python3", "/opt/quirky %h/show.py", HOSTILE, "$1 ; %n"],
                "workdir": "/opt/quirky %h", "environment": {"QUIRK": HOSTILE}},
    }
    (project / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    vmx = built_image(images_dir, project / "recipe.yaml", "quirky", "--no-validate")
    proc = run_vmbuild("validate", vmx, "--json")
    assert proc.returncode == 3, proc.stderr
    assert "exited with status 3" in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    output = [e["message"] for e in lines if e.get("kind") == "output"]
    values = next(json.loads(m[len("VALUES "):]) for m in output if m.startswith("VALUES "))
    assert values == {"argv": [HOSTILE, "$1 ; %n"], "env": HOSTILE, "cwd": "/opt/quirky %h"}


def test_validate_rejects_a_vmx_naming_a_missing_disk(hello_vmx: Path, tmp_path: Path) -> None:
    shutil.copy(hello_vmx, tmp_path / "hello.vmx")
    proc = run_vmbuild("validate", tmp_path / "hello.vmx")
    assert proc.returncode == 3
    assert "hello.vmdk" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_rejects_a_truncated_vmdk(hello_vmx: Path, tmp_path: Path) -> None:
    shutil.copy(hello_vmx, tmp_path / "hello.vmx")
    vmdk = tmp_path / "hello.vmdk"
    shutil.copy(hello_vmx.with_suffix(".vmdk"), vmdk)
    with vmdk.open("r+b") as f:
        f.truncate(vmdk.stat().st_size // 2)
    proc = run_vmbuild("validate", tmp_path / "hello.vmx")
    assert proc.returncode == 3
    assert "hello.vmdk" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_stops_packer_and_leaves_nothing(hello_vmx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vmbuild.cli", str(EXAMPLES / "hello" /
                             "recipe.yaml"), "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if "Waiting for SSH" in line or "provision:" in line or time.monotonic() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    status = proc.wait(timeout=120)
    assert status == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vmbuild-")]
    assert processes_mentioning(str(tmp_path)) == []  # no QEMU, no Packer left


def test_efi_nvme_image_boots(images_dir: Path, tmp_path: Path) -> None:
    """firmware: efi puts GRUB on an ESP; the validation boot (OVMF, NVMe) must run the job."""
    project = tmp_path / "efi"
    project.mkdir()
    (project / "recipe.yaml").write_text(
        "version: 1\nname: efi-hello\nguest:\n  firmware: efi\n"
        "output:\n  disk_controller: nvme\n"
        "job:\n  command: [/bin/sh, -c, 'test -d /sys/firmware/efi && echo booted by UEFI']\n")
    vmx = built_image(images_dir, project / "recipe.yaml", "efi-hello")
    manifest = json.loads((vmx.parent / "manifest.json").read_text())
    assert manifest["validated"] is True
    text = vmx.read_text()
    assert 'firmware = "efi"' in text and 'nvme0.present = "TRUE"' in text
    proc = run_vmbuild("validate", vmx, "--json")
    assert proc.returncode == 0, proc.stderr
    output = [json.loads(line)["message"] for line in proc.stdout.splitlines()
              if json.loads(line).get("kind") == "output"]
    assert output == ["booted by UEFI"]  # no firmware noise from the other serial ports


def test_failed_task_is_reported_with_its_name_and_stderr(tmp_path: Path) -> None:
    project = tmp_path / "broken"
    project.mkdir()
    (project / "recipe.yaml").write_text(
        "version: 1\nname: broken\nextends: debian-12-minimal\n"
        "application:\n  run:\n    - echo step one\n"
        "    - echo 'the compiler said no' >&2; exit 4\n"
        "job:\n  command: echo never\n")
    out = tmp_path / "out"
    proc = run_vmbuild(project / "recipe.yaml", "-o", out)
    assert proc.returncode == 1
    assert "task failed: run: echo 'the compiler said no' >&2; exit 4" in proc.stderr
    assert "the compiler said no" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vmbuild-")]
    assert processes_mentioning(str(tmp_path)) == []  # no QEMU, no Packer left
