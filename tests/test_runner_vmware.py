"""The VMware backend's lifecycle, against tests/standin/vmrun (a STAND-IN for VMware's
`vmrun`, not VMware: see that file). Fast: the stand-in's "guest" counts in 0.1 s steps.

The stand-in is strict where VMware's behaviour decides whether a job gets its inputs: it
parses the .vmx, refuses what VMware refuses (and a disk under a device key VMware would
silently ignore), records which disks it attached, and its guest reads the input disk's args
and writes a file onto the output disk, so these tests see inputs go in and outputs come
back for every disk controller.

The VM runs on child (delta) disks over the image's: the tests fingerprint the image (bytes and
mtimes) and check that nothing changes it, that the work directory never holds a copy of it,
and that a checkpoint moved elsewhere resumes against a copy of the image elsewhere. The
stand-in can also refuse a resume, replace serial files at power-on, keep its lock after a
suspend and crash (see its docstring); the tests wait for events with generous bounds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbuild.runner.vmx import load_vmx

from .runner_harness import Runner, settled_count

STANDIN = Path(__file__).parent / "standin"

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") is None,
    reason="needs qemu-img and mkfs.ext4 for the input/output disks")

HEADER = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "tiny"
guestOS = "debian12-64"
memsize = "512"
numvcpus = "1"
serial0.present = "TRUE"
serial0.fileType = "file"
serial0.fileName = "console.log"
serial1.present = "TRUE"
serial1.fileType = "file"
serial1.fileName = "job.log"
serial2.present = "TRUE"
serial2.fileType = "file"
serial2.fileName = "control.log"
"""

#: The tiny image's .vmx: the header above and one pvscsi disk.
VMX = HEADER + """\
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "tiny.vmdk"
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    out = tmp_path / "image"
    out.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(out / "tiny.vmdk"), "1M"],
                   check=True)
    (out / "tiny.vmx").write_text(VMX)
    return out / "tiny.vmx"


@pytest.fixture
def standin_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{STANDIN}{os.pathsep}{os.environ['PATH']}",
        "VMRUN_STANDIN_STATE": str(tmp_path / "vmrun-state"),
        "VMRUN_STANDIN_INTERVAL": "0.1",
    }


def vmrun(env: dict[str, str], *args: str) -> str:
    full = {**os.environ, **env}
    return subprocess.run([str(STANDIN / "vmrun"), "-T", "ws", *args], env=full,
                          capture_output=True, text=True, check=False).stdout


def running(env: dict[str, str]) -> list[str]:
    lines = vmrun(env, "list").splitlines()
    assert lines[0].startswith("Total running VMs: ")
    assert int(lines[0].split(":")[1]) == len(lines) - 1
    return lines[1:]


def start(image: Path, work: Path, env: dict[str, str], *extra: str) -> Runner:
    return Runner(image, "--backend", "vmware", "--workdir", work, *extra, env=env)


def test_runs_the_job_and_exits_with_its_status(image: Path, tmp_path: Path,
                                                standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "5", "VMRUN_STANDIN_STATUS": "3"}
    out = tmp_path / "out"
    runner = start(image, tmp_path / "work", env, "--input", str(image), "--output-dir", str(out))
    assert runner.wait(60) == 3, runner.describe()
    # the stand-in's guest writes one file onto the output disk; it came back
    assert [p.name for p in out.iterdir()] == ["standin-result.txt"]
    assert runner.numbers == [1, 2, 3, 4, 5]
    assert running(env) == []
    # the image itself was never run: VMware ran a child disk in the work directory
    assert not (image.parent / "job.log").exists()
    assert json.loads((tmp_path / "work" / "result.json").read_text())["status"] == 3


def test_suspend_resume_cycles_and_move(image: Path, tmp_path: Path,
                                        standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "60"}
    work = tmp_path / "work"
    seen: list[int] = []
    for cycle in range(3):
        if cycle == 2:
            moved = tmp_path / "moved" / "work"
            moved.parent.mkdir()
            shutil.move(str(work), moved)
            work = moved
        runner = start(image, work, env)
        runner.wait_number((seen[-1] if seen else 0) + 5, timeout=60)
        runner.signal(signal.SIGUSR1 if cycle != 1 else signal.SIGTERM)
        # ends in a suspend, within a generous bound (how fast is for bench/, not a test)
        assert runner.wait(120) == 85, runner.describe()
        seen += runner.numbers
        vm = work / "vm"
        assert (vm / "tiny.vmss").exists(), "VMware keeps a .vmss after suspend"
        assert not (vm / "tiny.vmx.lck").exists()
        assert running(env) == []
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    seen += last.numbers
    assert seen == list(range(1, 61))
    boots = {e.get("boot_id") for e in last_events(work) if e["event"] == "started"}
    assert len(boots) == 1


def last_events(work: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (work / "control.log").read_text().splitlines()
            if line.startswith("{")]


def test_suspend_slower_than_the_grace_time(image: Path, tmp_path: Path,
                                            standin_env: dict[str, str]) -> None:
    """The scheduler's SIGKILL comes while VMware is still suspending: VMware finishes, and
    the next run resumes the VM instead of losing it."""
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40", "VMRUN_STANDIN_SUSPEND_DELAY": "3"}
    work = tmp_path / "work"
    first = start(image, work, env)
    first.wait_number(5, timeout=60)
    first.signal(signal.SIGUSR1)
    time.sleep(0.8)  # the grace time: shorter than the suspend
    first.signal(signal.SIGKILL)
    first.wait(30)
    printed = set(first.numbers)
    second = start(image, work, env)
    assert second.wait(60) == 0, second.describe()
    assert any("still running" in line for line in second.err), second.describe()
    # nothing lost: together the runs printed every number, the VM never restarted the count
    assert printed | set(second.numbers) == set(range(1, 41))
    assert second.numbers[-1] == 40
    assert len({e.get("boot_id") for e in last_events(work) if e["event"] == "started"}) == 1
    assert running(env) == []


def test_vm_left_running_by_a_killed_runner(image: Path, tmp_path: Path,
                                            standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "50"}
    work = tmp_path / "work"
    first = start(image, work, env)
    first.wait_number(5, timeout=60)
    first.signal(signal.SIGKILL)
    first.wait(30)
    assert len(running(env)) == 1, "the stand-in VM outlives a killed runner, as VMware's"
    second = start(image, work, env)
    assert second.wait(60) == 0, second.describe()
    assert any("still running" in line for line in second.err), second.describe()
    assert set(first.numbers) | set(second.numbers) == set(range(1, 51))
    assert running(env) == []


def test_pause_and_unpause(image: Path, tmp_path: Path, standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    runner = start(image, tmp_path / "work", env)
    runner.wait_number(3, timeout=60)
    runner.signal(signal.SIGTSTP)
    runner.wait_err("VM paused", timeout=120)  # the runner confirms the pause
    before = settled_count(runner)  # numbers already on their way have arrived
    time.sleep(1.0)  # a window in which the running stand-in would print
    assert len(runner.numbers) == before
    runner.signal(signal.SIGCONT)
    assert runner.wait(60) == 0, runner.describe()
    assert runner.numbers == list(range(1, 31))


def test_periodic_checkpoints(image: Path, tmp_path: Path, standin_env: dict[str, str]) -> None:
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30", "VMRUN_STANDIN_SUSPEND_DELAY": "0.1"}
    runner = start(image, tmp_path / "work", env, "--checkpoint-every", "1s")
    assert runner.wait(90) == 0, runner.describe()
    assert runner.numbers == list(range(1, 31))
    assert sum("VM suspended" in line for line in runner.err) >= 2, runner.describe()


# --------------------------------------------------------------------------- disk keys


#: controller -> (.vmx lines for the controller and its boot disk, the device-key prefix)
CONTROLLERS = {
    "pvscsi": ('scsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n', "scsi0"),
    "lsilogic": ('scsi0.present = "TRUE"\nscsi0.virtualDev = "lsilogic"\n', "scsi0"),
    "sata": ('sata0.present = "TRUE"\n', "sata0"),
    "nvme": ('firmware = "efi"\nnvme0.present = "TRUE"\n', "nvme0"),
}


def make_image(root: Path, controller: str, extra: str = "") -> Path:
    """A fake image (a 1 MiB VMDK, nothing boots it: the stand-in's guest is simulated) on
    ``controller``, with the boot disk at unit 0, as vmbuild's artifact stage writes it."""
    lines, prefix = CONTROLLERS[controller]
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "adapter_type=lsilogic",
                    str(root / "tiny.vmdk"), "1M"], check=True)
    vmx = root / "tiny.vmx"
    vmx.write_text(HEADER + lines + f'{prefix}:0.present = "TRUE"\n'
                   f'{prefix}:0.fileName = "tiny.vmdk"\n' + extra)
    return vmx


def attached(env: dict[str, str]) -> list[dict[str, str]]:
    """The disks the stand-in attached at its last `start` (its record, one VM per test)."""
    records = list((Path(env["VMRUN_STANDIN_STATE"]) / "attached").glob("*.json"))
    assert len(records) == 1, records
    disks: list[dict[str, str]] = json.loads(records[0].read_text())["disks"]
    return disks


def ddb_adapter_type(vmdk: Path) -> str:
    """ddb.adapterType from a monolithicSparse VMDK's embedded descriptor."""
    text = vmdk.read_bytes()[:64 * 1024].decode("latin-1")
    return text.split('ddb.adapterType = "', 1)[1].split('"', 1)[0]


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_inputs_and_outputs_on_every_controller(controller: str, tmp_path: Path,
                                                standin_env: dict[str, str]) -> None:
    """The runner's .vmx names the system, input and output disks under the keys VMware
    reads; the strict stand-in accepts it; the job sees its args; its outputs come back."""
    image = make_image(tmp_path / "image", controller)
    prefix = CONTROLLERS[controller][1]
    data = tmp_path / "data.txt"
    data.write_text("input file\n")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "3"}
    out, work = tmp_path / "out", tmp_path / "work"
    runner = start(image, work, env, "--input", str(data), "--arg", "first",
                   "--arg", "two words", "--output-dir", str(out))
    assert runner.wait(60) == 0, runner.describe()
    disks = attached(env)
    assert [(d["key"], Path(d["file"]).name) for d in disks] == [
        (f"{prefix}:0", "system.vmdk"), (f"{prefix}:1", "input.vmdk"),
        (f"{prefix}:2", "output.vmdk")]
    kind = controller if prefix == "scsi0" else prefix[:-1]
    assert {d["controller"] for d in disks} == {kind}
    # qemu-img's default is "ide"; VMware writes lsilogic for every non-IDE adapter
    assert [d["adapterType"] for d in disks[1:]] == ["lsilogic", "lsilogic"]
    assert any(text == 'input args: ["first", "two words"]' for _t, text in runner.lines), \
        runner.describe()
    result = json.loads((out / "standin-result.txt").read_text())
    assert result == {"args": ["first", "two words"], "count": 3}
    assert runner.numbers == [1, 2, 3]


def test_runner_vmx_keys_and_descriptors(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """The .vmx the runner hands VMware (read while the VM is suspended, before the run
    cleans up): no key built from the controller's type, and the new disks' descriptors
    carry the adapter type of their controller."""
    image = make_image(tmp_path / "image", "lsilogic")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40"}
    work = tmp_path / "work"
    runner = start(image, work, env, "--arg", "x")
    runner.wait_number(2, timeout=60)
    runner.signal(signal.SIGUSR1)
    assert runner.wait(60) == 85, runner.describe()
    mapping = load_vmx(work / "vm" / "tiny.vmx")
    assert not [key for key in mapping if key.startswith("lsilogic")]
    assert mapping["scsi0:1.filename"] == "input.vmdk"
    assert mapping["scsi0:2.filename"] == "output.vmdk"
    assert mapping["scsi0:1.present"] == mapping["scsi0:2.present"] == "TRUE"
    for name in ("input.vmdk", "output.vmdk"):
        assert ddb_adapter_type(work / "vm" / name) == "lsilogic"
    last = start(image, work, env)  # the resumed VM is checked by the stand-in again
    assert last.wait(60) == 0, last.describe()


def test_scsi_unit_7_is_skipped(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """Units 1-6 taken: the job's disks go to 8 and 9 (SCSI ID 7 is the controller)."""
    extra = ""
    root = tmp_path / "image"
    for unit in range(1, 7):
        extra += f'scsi0:{unit}.present = "TRUE"\nscsi0:{unit}.fileName = "d{unit}.vmdk"\n'
    image = make_image(root, "pvscsi", extra)
    for unit in range(1, 7):
        shutil.copy(root / "tiny.vmdk", root / f"d{unit}.vmdk")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "1"}
    runner = start(image, tmp_path / "work", env, "--arg", "a", "--output-dir",
                   str(tmp_path / "out"))
    assert runner.wait(60) == 0, runner.describe()
    assert [d["key"] for d in attached(env)][-2:] == ["scsi0:8", "scsi0:9"]
    assert (tmp_path / "out" / "standin-result.txt").exists()


def test_no_free_unit_is_refused(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """NVMe has units 0-14: with all taken the runner refuses before starting anything."""
    extra = "".join(f'nvme0:{u}.present = "TRUE"\nnvme0:{u}.fileName = "tiny.vmdk"\n'
                    for u in range(1, 15))
    image = make_image(tmp_path / "image", "nvme", extra)
    runner = start(image, tmp_path / "work", standin_env)
    assert runner.wait(60) == 2, runner.describe()
    assert any("no free unit on nvme0 (units 0-14) for the job's output disk" in line
               for line in runner.err), runner.describe()
    assert running(standin_env) == []


# --------------------------------------------------------------------------- strict stand-in


def vmrun_rc(env: dict[str, str], *args: str) -> tuple[int, str]:
    full = {**os.environ, **env}
    proc = subprocess.run([str(STANDIN / "vmrun"), "-T", "ws", *args], env=full,
                          capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout


def test_standin_refuses_disks_under_the_controller_type(tmp_path: Path,
                                                         standin_env: dict[str, str]) -> None:
    """Yesterday's runner wrote `lsilogic0:1.fileName`: VMware ignores the key (the job ran
    without inputs, its outputs were lost); the strict stand-in refuses the VM instead."""
    root = tmp_path / "image"
    extra = ('lsilogic0:1.present = "TRUE"\nlsilogic0:1.fileName = "input.vmdk"\n'
             'lsilogic0:2.present = "TRUE"\nlsilogic0:2.fileName = "output.vmdk"\n')
    vmx = make_image(root, "lsilogic", extra)
    shutil.copy(root / "tiny.vmdk", root / "input.vmdk")
    shutil.copy(root / "tiny.vmdk", root / "output.vmdk")
    rc, out = vmrun_rc(standin_env, "start", str(vmx), "nogui")
    assert rc == 255
    assert out.startswith("Error: ") and '"lsilogic0:1.filename"' in out
    assert "not a device key VMware knows" in out
    assert running(standin_env) == []
    assert not (root / "tiny.vmx.lck").exists()
    # an image carrying such keys: the runner passes them on, the stand-in refuses to start
    runner = start(vmx, tmp_path / "work", standin_env)
    assert runner.wait(60) == 90, runner.describe()
    assert any("vmrun start failed" in line and "lsilogic0:1" in line for line in runner.err)


def _child_with_missing_parent(root: Path) -> str:
    parent = root / "parent.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(parent), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "hwversion=6", "-b",
                    "parent.vmdk", "-F", "vmdk", str(root / "child.vmdk")], check=True)
    parent.rename(root / "elsewhere.vmdk")
    return 'scsi0:1.present = "TRUE"\nscsi0:1.fileName = "child.vmdk"\n'


@pytest.mark.parametrize(("case", "edit", "message"), [
    ("missing file", 'scsi0:1.present = "TRUE"\nscsi0:1.fileName = "gone.vmdk"\n',
     "Cannot open the disk"),
    ("controller absent", 'scsi1:0.present = "TRUE"\nscsi1:0.fileName = "tiny.vmdk"\n',
     'on the controller "scsi1", which is not present'),
    ("controller FALSE", 'sata0.present = "FALSE"\nsata0:0.present = "TRUE"\n'
     'sata0:0.fileName = "tiny.vmdk"\n', 'on the controller "sata0", which is not present'),
    ("unit 7", 'scsi0:7.present = "TRUE"\nscsi0:7.fileName = "tiny.vmdk"\n',
     'Invalid configuration for device "scsi0:7" (SCSI ID 7 is the controller itself)'),
    ("sata unit 30", 'sata0.present = "TRUE"\nsata0:30.present = "TRUE"\n'
     'sata0:30.fileName = "tiny.vmdk"\n', 'Invalid configuration for device "sata0:30"'),
    ("device type", 'sata0.present = "TRUE"\nsata0:0.present = "TRUE"\n'
     'sata0:0.fileName = "tiny.vmdk"\nsata0:0.deviceType = "scsi-hardDisk"\n',
     'The device type "scsi-hardDisk" specified for "sata0:0" is not supported'),
    ("missing parent", None, "The parent of this virtual disk could not be opened"),
])
def test_standin_refuses_what_vmware_refuses(case: str, edit: str | None, message: str,
                                             tmp_path: Path,
                                             standin_env: dict[str, str]) -> None:
    root = tmp_path / "image"
    root.mkdir()
    vmx = make_image(root, "pvscsi", edit if edit is not None else
                     _child_with_missing_parent(root))
    rc, out = vmrun_rc(standin_env, "start", str(vmx), "nogui")
    assert rc == 255, (case, out)
    assert out.startswith("Error: ") and message in out, (case, out)
    assert running(standin_env) == []


def test_standin_accepts_a_child_disk_and_an_escaped_key(tmp_path: Path,
                                                         standin_env: dict[str, str]) -> None:
    """A delta disk whose parent is found (relative to the child, or absolute) is attached,
    with its adapter type; keys are case-insensitive and values |XX-unescaped as VMware
    reads them."""
    root = tmp_path / "image"
    root.mkdir()
    parent = root / "base" / "parent disk.vmdk"
    parent.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(parent), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "adapter_type=lsilogic,hwversion=6", "-b", "base/parent disk.vmdk", "-F",
                    "vmdk", str(root / "child.vmdk")], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", str(parent), "-F",
                    "vmdk", str(root / "abs|child.vmdk")], check=True)
    vmx = make_image(root, "pvscsi", 'SCSI0:1.Present = "TRUE"\nscsi0:1.FILENAME = '
                     '"child.vmdk"\nscsi0:2.present = "TRUE"\nscsi0:2.fileName = '
                     '"abs|7Cchild.vmdk"\n')
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "1"}
    rc, out = vmrun_rc(env, "start", str(vmx), "nogui")
    assert rc == 0, out
    disks = attached(env)
    assert [(d["key"], Path(d["file"]).name, d["adapterType"]) for d in disks] == [
        ("scsi0:0", "tiny.vmdk", "lsilogic"), ("scsi0:1", "child.vmdk", "lsilogic"),
        ("scsi0:2", "abs|child.vmdk", "ide")]
    for _ in range(600):  # the job counts to one and powers off
        if not (root / "tiny.vmx.lck").exists():
            break
        time.sleep(0.05)
    assert running(env) == []


# --------------------------------------------------------------------------- child disks


def fingerprint(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``directory``: its SHA-256, size and mtime (ns)."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                            p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def filled_image(root: Path) -> Path:
    """The tiny image with 512 KiB of data on its disk, so a copy of it would show."""
    vmx = make_image(root, "pvscsi")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 512k", str(root / "tiny.vmdk")],
                   check=True, capture_output=True)
    return vmx


def descriptor(vmdk: Path) -> dict[str, str]:
    """The key=value lines of a monolithicSparse VMDK's embedded descriptor."""
    head = vmdk.read_bytes()[:64 * 1024]
    offset = int.from_bytes(head[28:36], "little") * 512
    size = int.from_bytes(head[36:44], "little") * 512
    text = head[offset:offset + size].split(b"\0", 1)[0].decode()
    return {k.strip(): v.strip().strip('"') for k, _, v in
            (line.partition("=") for line in text.splitlines()) if _ and not k.startswith("#")}


def raw_bytes(vmdk: Path, tmp: Path) -> bytes:
    raw = tmp / f"{vmdk.name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(vmdk), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


def suspended(image: Path, work: Path, env: dict[str, str], at: int, *extra: str) -> Runner:
    """Run until the job printed ``at``, then SIGUSR1: the checkpoint is published (85)."""
    runner = start(image, work, env, *extra)
    runner.wait_number(at, timeout=60)
    runner.signal(signal.SIGUSR1)
    assert runner.wait(60) == 85, runner.describe()
    return runner


def boot_ids(work: Path) -> list[object]:
    return [e.get("boot_id") for e in last_events(work) if e["event"] == "started"]


def test_the_system_disk_is_a_child_of_the_image(tmp_path: Path,
                                                 standin_env: dict[str, str]) -> None:
    """After a suspend the work directory holds a child of the image's disk, never a copy;
    the guest's writes went to the child; the image's bytes and mtimes never change."""
    image = filled_image(tmp_path / "image")
    before = fingerprint(image.parent)
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    work = tmp_path / "work"
    suspended(image, work, env, 3, "--arg", "x")
    disk = image.parent / "tiny.vmdk"
    child = work / "vm" / "system.vmdk"
    fields = descriptor(child)
    assert fields["parentFileNameHint"] == str(disk)
    assert fields["parentCID"] == descriptor(disk)["CID"]
    assert load_vmx(work / "vm" / "tiny.vmx")["scsi0:0.filename"] == "system.vmdk"
    image_sum = hashlib.sha256(disk.read_bytes()).hexdigest()
    copies = [name for name, (digest, _s, _m) in fingerprint(work).items() if digest == image_sum]
    assert copies == [], "the work directory holds a copy of the image's disk"
    assert child.stat().st_size < disk.stat().st_size
    # the stand-in's guest wrote its boot record (64 KiB of 0x01) onto the system disk:
    # it reads back through the child, over the image's data beyond it
    data = raw_bytes(child, tmp_path)
    assert data[:64 * 1024] == b"\x01" * (64 * 1024)
    assert data[64 * 1024:512 * 1024] == b"\x5a" * (448 * 1024)
    assert fingerprint(image.parent) == before
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert fingerprint(image.parent) == before


def test_checkpoint_moved_with_the_image_elsewhere(tmp_path: Path,
                                                   standin_env: dict[str, str]) -> None:
    """HTCondor's case: the work directory comes back in a new sandbox and the image is
    copied there afresh. The child's parentFileNameHint is rewritten to the new copy (the
    old path is gone, so the strict stand-in would refuse the chain otherwise)."""
    image = filled_image(tmp_path / "site1" / "image")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40"}
    work = tmp_path / "site1" / "work"
    first = suspended(image, work, env, 5)
    old_fields = descriptor(work / "vm" / "system.vmdk")
    new_image_dir = tmp_path / "site2" / "sandbox" / "image"
    shutil.copytree(image.parent, new_image_dir)
    before = fingerprint(new_image_dir)
    moved = tmp_path / "site2" / "sandbox" / "work"
    shutil.move(str(work), moved)
    shutil.rmtree(tmp_path / "site1")
    second = start(new_image_dir / "tiny.vmx", moved, env)
    assert second.wait(60) == 0, second.describe()
    assert any("its parent disk is now" in line for line in second.err), second.describe()
    assert first.numbers + second.numbers == list(range(1, 41))
    assert len(set(boot_ids(moved))) == 1, "the same boot resumed"
    assert fingerprint(new_image_dir) == before
    assert old_fields["parentFileNameHint"] == str(image.parent / "tiny.vmdk")
    assert old_fields["parentCID"] == descriptor(new_image_dir / "tiny.vmdk")["CID"]


def test_another_image_is_refused(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """A checkpoint resumed with an image of other content: exit 90, the checkpoint kept."""
    image = filled_image(tmp_path / "image")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40"}
    work = tmp_path / "work"
    suspended(image, work, env, 3)
    other = make_image(tmp_path / "other", "pvscsi")  # same names, another disk
    runner = start(other, work, env)
    assert runner.wait(60) == 90, runner.describe()
    assert any("belongs to another image" in line for line in runner.err), runner.describe()
    assert (work / "vm" / "tiny.vmss").exists()
    assert running(env) == []
    resumed = start(image, work, env)
    assert resumed.wait(60) == 0, resumed.describe()


# --------------------------------------------------------------------------- degrading


def test_refused_resume_restarts_the_job_from_the_image(tmp_path: Path,
                                                       standin_env: dict[str, str]) -> None:
    """VMware refuses the saved state (other CPU features): the runner says so, starts the
    job afresh from the image on the same inputs, and it finishes; result.json counts it."""
    image = filled_image(tmp_path / "image")
    before = fingerprint(image.parent)
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "50", "VMRUN_STANDIN_STATUS": "4"}
    work, out = tmp_path / "work", tmp_path / "out"
    suspended(image, work, env, 5, "--arg", "same input")
    refusing = {**env, "VMRUN_STANDIN_REFUSE_RESUME": "1"}
    runner = start(image, work, refusing, "--output-dir", str(out))  # no --arg this time
    assert runner.wait(60) == 4, runner.describe()
    assert any("VMware refused to resume the suspended VM" in line and
               "features supported by the processors" in line for line in runner.err), \
        runner.describe()
    assert any("starting the job afresh from the image" in line for line in runner.err)
    assert runner.numbers == list(range(1, 51)), "the count is complete, from 1"
    assert any(text == 'input args: ["same input"]' for _t, text in runner.lines), \
        runner.describe()
    assert json.loads((out / "standin-result.txt").read_text())["args"] == ["same input"]
    result = json.loads((work / "result.json").read_text())
    assert result["status"] == 4 and result["resume_failures"] == 1
    assert len(set(boot_ids(work))) == 2, "a second boot"
    assert fingerprint(image.parent) == before
    assert running(env) == []


def test_refused_resume_with_fail_keeps_the_checkpoint(tmp_path: Path,
                                                       standin_env: dict[str, str]) -> None:
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "50"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3)
    refusing = {**env, "VMRUN_STANDIN_REFUSE_RESUME": "Error while restoring (stand-in)"}
    runner = start(image, work, refusing, "--on-resume-failure", "fail")
    assert runner.wait(60) == 90, runner.describe()
    assert any("Error while restoring (stand-in)" in line and "--on-resume-failure fail" in line
               for line in runner.err), runner.describe()
    assert (work / "vm" / "tiny.vmss").exists()
    last = start(image, work, env)  # a host that resumes it
    assert last.wait(60) == 0, last.describe()
    assert first.numbers + last.numbers == list(range(1, 51))


def test_replaced_serial_files_lose_no_output(tmp_path: Path,
                                              standin_env: dict[str, str]) -> None:
    """VMware may replace a serial file at power-on instead of appending: the runner moves
    the files aside before every power-on (resume and after each periodic checkpoint), so
    no output and no exit event is lost."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "70", "VMRUN_STANDIN_STATUS": "7",
           "VMRUN_STANDIN_SERIAL": "replace", "VMRUN_STANDIN_SUSPEND_DELAY": "0.1"}
    work = tmp_path / "work"
    seen: list[int] = []
    for at in (5, 12):
        seen += suspended(image, work, env, at).numbers
    last = start(image, work, env, "--checkpoint-every", "1s")
    assert last.wait(90) == 7, last.describe()
    assert sum("VM suspended" in line for line in last.err) >= 1, last.describe()
    assert seen + last.numbers == list(range(1, 71))
    assert len(set(boot_ids(work))) == 1


def test_publishes_after_vmware_releases_the_lock(tmp_path: Path,
                                                  standin_env: dict[str, str]) -> None:
    """VMware's lock outlives `vmrun suspend` (here by 1.5 s): the checkpoint is published
    only once it is gone, and the periodic checkpoint's power-on (refused while the lock
    exists) works."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "50", "VMRUN_STANDIN_LOCK_LINGER": "1.5",
           "VMRUN_STANDIN_SUSPEND_DELAY": "0.1"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 4)
    assert not (work / "vm" / "tiny.vmx.lck").exists()
    assert json.loads((work / "vmware.json").read_text())["state"] == "suspended"
    last = start(image, work, env, "--checkpoint-every", "1s")
    assert last.wait(90) == 0, last.describe()
    assert sum("VM suspended" in line for line in last.err) >= 1, last.describe()
    assert first.numbers + last.numbers == list(range(1, 51))


def test_a_crashed_vm_ends_the_run_with_92(tmp_path: Path,
                                           standin_env: dict[str, str]) -> None:
    """vmware-vmx dies: no power-off, its lock stays, `vmrun list` forgets it. The run ends
    with 92 (the lock alone would never go) and says why."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "100000"}
    work = tmp_path / "work"
    runner = start(image, work, env)
    runner.wait_number(3, timeout=60)
    assert vmrun(env, "_crash", str(work / "vm" / "tiny.vmx")) == ""
    assert (work / "vm" / "tiny.vmx.lck").exists(), "the stand-in left its lock, as VMware"
    assert runner.wait(60) == 92, runner.describe()
    assert any("vmrun list does not name it" in line for line in runner.err), runner.describe()
    assert running(env) == []


def test_a_stale_lock_is_removed_at_start(tmp_path: Path,
                                          standin_env: dict[str, str]) -> None:
    """A lock no running VM owns is removed before the power-on (the stand-in, like VMware
    given a lock from another host, refuses a locked VM): one brought along with a
    checkpoint, and one left by a VM that crashed after its runner was killed."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "60"}
    work = tmp_path / "work"
    vmx = work / "vm" / "tiny.vmx"
    first = suspended(image, work, env, 3)
    lock = work / "vm" / "tiny.vmx.lck"
    lock.mkdir()  # as VMware leaves it: a directory with a lock file from another host
    (lock / "M31415.lck").write_text("other-host\n")
    second = start(image, work, env)
    second.wait_number(first.numbers[-1] + 2, timeout=60)
    assert any("removing tiny.vmx.lck" in line for line in second.err), second.describe()
    second.signal(signal.SIGKILL)  # the runner dies, then its VM crashes
    second.wait(30)
    assert vmrun(env, "_crash", str(vmx)) == ""
    assert lock.exists() and running(env) == []
    third = start(image, work, env)
    assert third.wait(60) == 0, third.describe()
    assert third.numbers == list(range(1, 61)), "nothing saved since the crash: afresh"


# --------------------------------------------------------------------------- transport form


def transport_only(root: Path) -> Path:
    """The filled image as `vmbuild submit` ships it: its .vmx and tiny.vmdk.zst, no
    tiny.vmdk (zstd --rm); the original is kept beside the image for comparisons."""
    vmx = filled_image(root)
    shutil.copy(root / "tiny.vmdk", root.parent / "original.vmdk")
    subprocess.run(["zstd", "-q", "--rm", str(root / "tiny.vmdk")], check=True)
    return vmx


def expansions(work: Path) -> list[Path]:
    return sorted(work.glob("expanded-*"))


needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")


@needs_zstd
def test_transport_form_runs_end_to_end(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """Only .vmx + .vmdk.zst: the runner expands the disk once into the work directory, the
    children are made over that monolithicSparse VMDK (the stand-in checks the chain), the
    job gets its inputs and returns its outputs, result.json says what the expansion cost;
    the image is not touched and the expansion is gone when the runner leaves."""
    image = transport_only(tmp_path / "image")
    before = fingerprint(image.parent)
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "5"}
    work, out = tmp_path / "work", tmp_path / "out"
    runner = start(image, work, env, "--arg", "zst", "--output-dir", str(out))
    assert runner.wait(60) == 0, runner.describe()
    assert any(line.startswith("vmbuild-run: expanded tiny.vmdk.zst (") and " MiB in " in line
               for line in runner.err), runner.describe()
    assert runner.numbers == [1, 2, 3, 4, 5]
    assert json.loads((out / "standin-result.txt").read_text())["args"] == ["zst"]
    system = Path(attached(env)[0]["file"])
    assert system.name == "system.vmdk"
    result = json.loads((work / "result.json").read_text())
    [record] = result["expansions"]
    assert record["source"] == "tiny.vmdk.zst" and record["reused"] is False
    assert record["expanded_bytes"] == (tmp_path / "original.vmdk").stat().st_size
    assert result["expansion_seconds"] == pytest.approx(record["seconds"])
    assert fingerprint(image.parent) == before
    assert expansions(work) == [], "the image travels in, never back with the work dir"


@needs_zstd
def test_transport_suspend_resume_reuses_the_expansion(tmp_path: Path,
                                                       standin_env: dict[str, str]) -> None:
    """With --keep-base the expansion stays in the work directory across suspends: the
    resumes reuse it (no second zstd run); the child's parent is the expanded VMDK, whose
    content ID is the image's; without --keep-base the last run removes it."""
    image = transport_only(tmp_path / "image")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "40"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3, "--keep-base")
    [expanded] = expansions(work)
    fields = descriptor(work / "vm" / "system.vmdk")
    assert fields["parentFileNameHint"] == str(expanded / "tiny.vmdk")
    assert fields["parentCID"] == descriptor(tmp_path / "original.vmdk")["CID"]
    second = suspended(image, work, env, first.numbers[-1] + 3, "--keep-base")
    assert any("using expanded-" in line and "by an earlier run" in line
               for line in second.err), second.describe()
    assert not any("expanded tiny.vmdk.zst" in line for line in second.err)
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert first.numbers + second.numbers + last.numbers == list(range(1, 41))
    assert len(set(boot_ids(work))) == 1, "the same boot resumed"
    result = json.loads((work / "result.json").read_text())
    assert [e["reused"] for e in result["expansions"]] == [False, True, True]
    assert expansions(work) == []


@needs_zstd
def test_transport_resume_after_leaving_expands_again(tmp_path: Path,
                                                      standin_env: dict[str, str]) -> None:
    """By default the expansion leaves with the runner; the resume expands the .zst again,
    to the same bytes, so the suspended children's parent content ID still matches."""
    image = transport_only(tmp_path / "image")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3)
    assert expansions(work) == []
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert any("expanded tiny.vmdk.zst" in line for line in last.err), last.describe()
    assert first.numbers + last.numbers == list(range(1, 31))
    assert len(set(boot_ids(work))) == 1


# --------------------------------------------------------------------------- compressed memory


MiB = 1 << 20


@needs_zstd
def test_compressed_memory_round_trip(tmp_path: Path, standin_env: dict[str, str]) -> None:
    """A checkpoint left behind holds the memory as .vmem.zst (a fraction of memsize), the
    record names it, the log says the sizes; the resume expands it back to the .vmem the
    stand-in checks (size and content) and the same boot continues."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3)
    vm = work / "vm"
    assert not (vm / "tiny.vmem").exists()
    packed = (vm / "tiny.vmem.zst").stat().st_size
    assert packed < 512 * MiB // 4, packed
    assert "tiny.vmem.zst" in json.loads((work / "vmware.json").read_text())["files"]
    line = next(line for line in first.err if "VM suspended in" in line)
    assert f"tiny.vmem 512 MiB -> tiny.vmem.zst {packed / MiB:.1f} MiB in " in line, line
    assert "MiB in the work directory)" in line
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert any(f"expanded tiny.vmem.zst ({packed / MiB:.1f} MiB) to tiny.vmem (512 MiB)" in
               line for line in last.err), last.describe()
    assert first.numbers + last.numbers == list(range(1, 31))
    assert len(set(boot_ids(work))) == 1


@needs_zstd
def test_standin_refuses_a_missing_or_wrong_memory_file(tmp_path: Path,
                                                        standin_env: dict[str, str]) -> None:
    """As VMware: no resume without the .vmem, or with one of another size; stricter: nor
    with one whose content differs from what was saved. The right one resumes."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3)
    vm = work / "vm"
    vmx = vm / "tiny.vmx"
    rc, out = vmrun_rc(env, "start", str(vmx), "nogui")
    assert rc == 255 and "Cannot open the memory file" in out, out
    subprocess.run(["zstd", "-q", "-d", "-k", str(vm / "tiny.vmem.zst")], check=True)
    good = (vm / "tiny.vmem").read_bytes()
    with open(vm / "tiny.vmem", "r+b") as f:
        f.truncate(256 * MiB)
    rc, out = vmrun_rc(env, "start", str(vmx), "nogui")
    assert rc == 255 and "bytes, but the virtual machine was suspended with" in out, out
    offset = json.loads((vm / "tiny.vmss").read_text())["memory"]["regions"][0][0]
    broken = bytearray(good)
    broken[offset + 100] ^= 0xFF
    (vm / "tiny.vmem").write_bytes(bytes(broken))
    rc, out = vmrun_rc(env, "start", str(vmx), "nogui")
    assert rc == 255 and "does not hold what the virtual machine saved" in out, out
    assert running(env) == []
    (vm / "tiny.vmem").unlink()  # the runner expands the .zst again
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert first.numbers + last.numbers == list(range(1, 31))


FAKE_ZSTD = """\
#!{python}
# zstd for this test: compressing (-1) writes part of the output, says so and hangs until
# the test SIGKILLs it; anything else is the real zstd.
import os, sys, time
if "-1" not in sys.argv or "-d" in sys.argv:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
out = sys.argv[sys.argv.index("-o") + 1]
with open(out, "wb") as f:
    f.write(b"\\x28\\xb5\\x2f\\xfd" + bytes(4096))
open({ready!r}, "w").write(str(os.getpid()))
time.sleep(600)
"""


@needs_zstd
def test_sigkill_during_memory_compression(tmp_path: Path,
                                           standin_env: dict[str, str]) -> None:
    """The runner is SIGKILLed while zstd compresses the .vmem (VMware's suspend is done):
    the suspended VM is intact (.vmss + .vmem; the half-written .zst is never read), the
    next run resumes it, nothing is lost, nothing runs twice."""
    image = make_image(tmp_path / "image", "pvscsi")
    fake = tmp_path / "bin" / "zstd"
    fake.parent.mkdir()
    ready = tmp_path / "zstd-ready"
    fake.write_text(FAKE_ZSTD.format(python=sys.executable, real=shutil.which("zstd"),
                                     ready=str(ready)))
    fake.chmod(0o755)
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    hanging = {**env, "PATH": f"{fake.parent}{os.pathsep}{env['PATH']}"}
    work = tmp_path / "work"
    first = start(image, work, hanging)
    first.wait_number(3, timeout=60)
    first.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, first.describe()
        time.sleep(0.05)
    first.signal(signal.SIGKILL)
    first.wait(30)
    os.kill(int(ready.read_text()), signal.SIGKILL)  # the fake zstd, started for this test
    vm = work / "vm"
    assert sorted(p.name for p in vm.glob("tiny.vmem*")) == ["tiny.vmem",
                                                             "tiny.vmem.zst.partial"]
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert not any("expanded tiny.vmem.zst" in line for line in last.err)
    assert set(first.numbers) | set(last.numbers) == set(range(1, 31))
    assert last.numbers[-1] == 30 and len(set(boot_ids(work))) == 1


@needs_zstd
@pytest.mark.parametrize("left", ["both", "expanding"])
def test_memory_states_a_kill_can_leave(left: str, tmp_path: Path,
                                        standin_env: dict[str, str]) -> None:
    """A kill after the .zst was renamed into place but before the .vmem went ("both"), or
    while the resume expanded it ("expanding": a half .vmem.partial): either resumes."""
    image = make_image(tmp_path / "image", "pvscsi")
    env = {**standin_env, "VMRUN_STANDIN_COUNT": "30"}
    work = tmp_path / "work"
    first = suspended(image, work, env, 3)
    vm = work / "vm"
    if left == "both":
        subprocess.run(["zstd", "-q", "-d", "-k", str(vm / "tiny.vmem.zst")], check=True)
    else:
        (vm / "tiny.vmem.partial").write_bytes(bytes(MiB))
    last = start(image, work, env)
    assert last.wait(60) == 0, last.describe()
    assert first.numbers + last.numbers == list(range(1, 31))
    assert len(set(boot_ids(work))) == 1
