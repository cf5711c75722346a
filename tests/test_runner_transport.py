"""The image's transport form (``NAME.vmdk.zst``): the runner expands it once into the work
directory, kill-safely, and refuses what it must not open. Fast: small real VMDKs made with
qemu-img, real zstd; nothing boots (the QEMU backend is driven up to its disks, not QEMU;
the VMware backend's runs are in tests/test_runner_vmware.py, against the stand-in)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmbuild.runner import transport
from vmbuild.runner.contract import EXIT_VM_START_FAILED
from vmbuild.runner.core import JobStreams, RunnerError, RunOptions, Workdir, source_key
from vmbuild.runner.qemu import QemuBackend
from vmbuild.runner.vmx import load_vmx, vmx_info

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "zstd")),
    reason="needs qemu-img, qemu-io and zstd")

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "tiny"
guestOS = "debian12-64"
memsize = "256"
numvcpus = "1"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "tiny.vmdk"
"""


def make_vmdk(path: Path, mib: int = 64, data_mib: int = 8) -> Path:
    """A monolithicSparse VMDK as the build writes it, with ``data_mib`` MiB written."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=monolithicSparse,adapter_type=lsilogic,hwversion=6",
                    str(path), f"{mib}M"], check=True)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", f"write -P 0x5a 1M {data_mib}M", str(path)],
                   check=True, capture_output=True)
    return path


def transport_image(root: Path, keep_plain: bool = False) -> tuple[Path, Path]:
    """(the .vmx, the original VMDK kept aside) of an image holding only .vmx + .vmdk.zst."""
    root.mkdir(parents=True)
    vmdk = make_vmdk(root / "tiny.vmdk")
    subprocess.run(["zstd", "-q", "-9", "--long=27", str(vmdk)], check=True)
    original = root.parent / f"{root.name}-original.vmdk"
    shutil.copy(vmdk, original)
    if not keep_plain:
        vmdk.unlink()
    (root / "tiny.vmx").write_text(VMX)
    return root / "tiny.vmx", original


def test_expands_once_and_reuses(tmp_path: Path) -> None:
    vmx, original = transport_image(tmp_path / "image")
    work = tmp_path / "work"
    work.mkdir()
    zst = transport.transport_file(vmx.parent, "tiny.vmdk")
    assert zst == vmx.parent / "tiny.vmdk.zst"
    disk, first = transport.expand(zst, work)
    assert disk.parent.name == transport.expansion_dir(zst)
    assert disk.name == "tiny.vmdk", "the extent's own name: VMware opens it by that name"
    assert disk.read_bytes() == original.read_bytes()
    assert source_key(disk) == source_key(original), "the same key as the plain disk"
    assert not first.reused and first.expanded_bytes == original.stat().st_size
    assert first.describe().startswith("expanded tiny.vmdk.zst (")
    assert disk.stat().st_blocks * 512 < disk.stat().st_size, "kept sparse"
    assert [p.name for p in work.iterdir()] == [disk.parent.name], "no staging left"
    mtime = disk.stat().st_mtime_ns
    again, second = transport.expand(zst, work)
    assert again == disk and second.reused and disk.stat().st_mtime_ns == mtime
    assert second.seconds == pytest.approx(first.seconds, abs=0.001)
    # the expansion is the runner's: kept for this image, collected for another
    keep = transport.kept_names(vmx.parent, ["tiny.vmdk"])
    assert keep == [disk.parent.name]
    assert Workdir(work).collect(keep) == []
    assert Workdir(work).collect([]) == [disk.parent.name]


def test_the_plain_disk_wins(tmp_path: Path) -> None:
    vmx, _original = transport_image(tmp_path / "image", keep_plain=True)
    assert transport.transport_file(vmx.parent, "tiny.vmdk") is None


def test_a_torn_expansion_is_never_used(tmp_path: Path) -> None:
    """What a SIGKILL mid-expansion leaves (a staging directory with half a disk) is not the
    expansion; nor is a final directory whose disk does not match its record."""
    vmx, original = transport_image(tmp_path / "image")
    zst = vmx.parent / "tiny.vmdk.zst"
    work = tmp_path / "work"
    stage = work / ".stage-expand-0badf00d"
    stage.mkdir(parents=True)
    (stage / "tiny.vmdk").write_bytes(original.read_bytes()[: 1 << 20])
    disk, expansion = transport.expand(zst, work)
    assert not expansion.reused and disk.read_bytes() == original.read_bytes()
    assert Workdir(work).collect(transport.kept_names(vmx.parent, ["tiny.vmdk"])) == \
        [stage.name], "the next start collects the leftover"
    # a final directory whose disk was cut short afterwards: expanded again
    with open(disk, "r+b") as f:
        f.truncate(1 << 20)
    disk, expansion = transport.expand(zst, work)
    assert not expansion.reused and disk.read_bytes() == original.read_bytes()


FAKE_ZSTD = """\
#!{python}
# A zstd that writes part of its output, says where it is and hangs (to be SIGKILLed).
import os, sys, time
out = sys.argv[sys.argv.index("-o") + 1]
with open(out, "wb") as f:
    f.write(b"KDMV" + bytes(1 << 20))
open({ready!r}, "w").write(str(os.getpid()))
time.sleep(600)
"""


def test_sigkill_during_expansion_leaves_nothing_usable(tmp_path: Path) -> None:
    """The runner is killed while zstd writes: no expansion exists afterwards, and the next
    expansion (a real zstd) produces the whole disk."""
    vmx, original = transport_image(tmp_path / "image")
    zst = vmx.parent / "tiny.vmdk.zst"
    work = tmp_path / "work"
    work.mkdir()
    fake = tmp_path / "bin" / "zstd"
    fake.parent.mkdir()
    ready = tmp_path / "zstd-ready"
    fake.write_text(FAKE_ZSTD.format(python=sys.executable, ready=str(ready)))
    fake.chmod(0o755)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from vmbuild.runner import transport
        transport.expand(Path({str(zst)!r}), Path({str(work)!r}))
    """)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the fake zstd never ran"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    os.kill(int(ready.read_text()), signal.SIGKILL)  # the fake zstd this test started
    assert [p.name for p in work.iterdir() if p.name.startswith(transport.PREFIX)] == []
    disk, expansion = transport.expand(zst, work)
    assert not expansion.reused and disk.read_bytes() == original.read_bytes()


@pytest.mark.parametrize("case", ["delta disk", "other extent", "not a vmdk", "corrupt"])
def test_refuses_what_it_must_not_open(case: str, tmp_path: Path) -> None:
    """A .zst holding a delta disk (its parent could be any file), a descriptor naming
    another extent file, or no VMDK at all is refused; nothing is left in the work dir."""
    image = tmp_path / "image"
    image.mkdir()
    inner = image / "tiny.vmdk"
    if case == "delta disk":
        make_vmdk(image / "parent.vmdk")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "hwversion=6", "-b",
                        "parent.vmdk", "-F", "vmdk", str(inner)], check=True)
    elif case == "other extent":
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(image / "x.vmdk"), "8M"],
                       check=True)
        data = (image / "x.vmdk").read_bytes()  # its extent renamed: another file
        inner.write_bytes(data.replace(b'SPARSE "x.vmdk"', b'SPARSE "y.vmdk"'))
    else:
        inner.write_bytes(b"not a disk\n" * 1000)
    subprocess.run(["zstd", "-q", "--rm", str(inner)], check=True)
    zst = image / "tiny.vmdk.zst"
    if case == "corrupt":
        flipped = bytearray(zst.read_bytes())
        flipped[len(flipped) // 2] ^= 0xFF
        zst.write_bytes(bytes(flipped))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RunnerError) as caught:
        transport.expand(zst, work)
    message = str(caught.value)
    assert {"delta disk": "a delta disk", "other extent": "names other extent files",
            "not a vmdk": "no KDMV header", "corrupt": "zstd exit"}[case] in message, message
    assert list(work.iterdir()) == []


def test_no_zstd_is_a_clear_start_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vmx, _original = transport_image(tmp_path / "image")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RunnerError) as caught:
        transport.expand(vmx.parent / "tiny.vmdk.zst", tmp_path)
    assert caught.value.exit_code == EXIT_VM_START_FAILED == 90
    assert "no zstd program" in str(caught.value) and "install the zstd package" in \
        str(caught.value)


def test_a_zst_linked_from_outside_is_refused(tmp_path: Path) -> None:
    transport_image(tmp_path / "elsewhere")
    image = tmp_path / "image"
    image.mkdir()
    (image / "tiny.vmdk.zst").symlink_to(tmp_path / "elsewhere" / "tiny.vmdk.zst")
    with pytest.raises(RunnerError) as caught:
        transport.transport_file(image, "tiny.vmdk")
    assert caught.value.exit_code == 2 and "leading out of the image directory" in \
        str(caught.value)


def test_header_and_content_size_without_expanding(tmp_path: Path) -> None:
    """What the schedulers read: the declared content size and the VMDK's first sector."""
    vmx, original = transport_image(tmp_path / "image")
    zst = vmx.parent / "tiny.vmdk.zst"
    assert transport.zstd_content_size(zst) == original.stat().st_size
    head = transport.zstd_head(zst)
    assert head == original.read_bytes()[:512]
    assert int.from_bytes(head[12:20], "little") * 512 == 64 << 20
    assert transport.zstd_content_size(original) is None


# --------------------------------------------------------------------------- QEMU backend


def qemu_backend(vmx: Path, work: Path, keep_base: bool = False) -> QemuBackend:
    """The QEMU backend up to its disks (no QEMU is started)."""
    work.mkdir(exist_ok=True)
    options = RunOptions(vmx=vmx, workdir=work, keep_base=keep_base)
    backend = QemuBackend(options, JobStreams(work, quiet=True))
    backend.info = vmx_info(load_vmx(vmx))
    return backend


@pytest.mark.skipif(shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:" + os.environ["PATH"])
                    is None, reason="needs mkfs.ext4 for the output disk")
def test_qemu_expands_then_converts_with_a_stable_key(tmp_path: Path) -> None:
    """A fresh start on a transport-only image: the .zst is expanded, the expansion is
    converted to the qcow2 base named by the plain disk's key (so a checkpoint finds its base
    whichever form the next sandbox got), the base holds the image's bytes; leaving drops
    both; a resume that needs the base again gets the same name."""
    vmx, original = transport_image(tmp_path / "image")
    work = tmp_path / "work"
    backend = qemu_backend(vmx, work)
    logged: list[str] = []
    from vmbuild.runner import core

    previous = core.set_log_sink(logged.append)
    try:
        backend._prepare_disks(vmx)
    finally:
        core.set_log_sink(previous)
        backend.streams.close()
    base = backend.chains["system"]["layers"][0]["file"]
    assert base == f"base-{source_key(original)}.qcow2"
    assert any(line.startswith("expanded tiny.vmdk.zst (") for line in logged), logged
    assert any("converting tiny.vmdk to qcow2" in line for line in logged), logged
    subprocess.run(["qemu-img", "compare", "-q", "-f", "vmdk", "-F", "qcow2", str(original),
                    str(work / base)], check=True)
    expanded = work / transport.expansion_dir(vmx.parent / "tiny.vmdk.zst")
    assert expanded.is_dir()
    assert backend.expansions and backend.expansions[0]["reused"] is False
    assert backend.expansion_result()["expansion_seconds"] >= 0
    # the start's garbage collection keeps both (a runner killed now resumes with them)
    assert set(backend._cached_base_names(None)) >= {base, expanded.name}
    backend._drop_bases()  # the runner leaves: only what the job wrote stays
    assert not (work / base).exists() and not expanded.exists()
    again = qemu_backend(vmx, work)
    try:
        again._ensure_bases(vmx, {"disks": {"system": {"layers": [{"file": base,
                                                                   "base": True}]}}})
    finally:
        again.streams.close()
    assert (work / base).is_file() and expanded.is_dir()


@pytest.mark.skipif(shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:" + os.environ["PATH"])
                    is None, reason="needs mkfs.ext4 for the output disk")
def test_qemu_keep_base_reuses_the_expansion(tmp_path: Path) -> None:
    vmx, _original = transport_image(tmp_path / "image")
    work = tmp_path / "work"
    first = qemu_backend(vmx, work, keep_base=True)
    try:
        first._prepare_disks(vmx)
        first._drop_bases()
    finally:
        first.streams.close()
    second = qemu_backend(vmx, work, keep_base=True)
    try:
        second._prepare_disks(vmx)
    finally:
        second.streams.close()
    assert [e["reused"] for e in second.expansions] == [True]
    result = json.dumps(second.expansion_result())
    assert '"reused": true' in result
