"""Schedulers ship an image's transport form: ``NAME.vmx`` + ``NAME.vmdk.zst``, not the VMDK.

HTCondor: ``transfer_input_files`` names the .zst (the runner expands it in the sandbox),
the scratch-disk request counts the expansion, the capacity comes from the plain VMDK, the
zstd stream's first sector or the manifest. Slurm: the script copies the transport form
into the job's own image directory once and runs the runner on that copy. Fast: small real
VMDKs (qemu-img), real zstd, HTCondor's own submit parser, bash with a fake runner."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import htcondor2
import pytest

from tests.scheduler_images import make_image
from vmbuild.schedulers import SubmitOptions, image_facts, render_sbatch, render_submit

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("zstd") is None,
    reason="needs qemu-img and zstd")

FAKE = Path(__file__).with_name("fake_runner.py")
MiB = 1 << 20
CAPACITY_MIB = 256


def transport_image(directory: Path, *, keep_plain: bool = True) -> Path:
    """A built image as the artifact stage publishes it: hello.vmx, a monolithicSparse
    hello.vmdk (16 MiB of data), hello.vmdk.zst, manifest.json; ``keep_plain=False`` removes
    the VMDK (what a sandbox receives)."""
    vmx = make_image(directory, memory_mib=2048)
    for old in ("hello.vmdk", "hello-flat.vmdk"):
        (directory / old).unlink()
    vmdk = directory / "hello.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse",
                    str(vmdk), f"{CAPACITY_MIB}M"], check=True)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x33 0 16M", str(vmdk)],
                   check=True, capture_output=True)
    subprocess.run(["zstd", "-q", "-9", "--long=27", str(vmdk)], check=True)
    (directory / "manifest.json").write_text(json.dumps({
        "name": "hello", "sizes": {"virtual": CAPACITY_MIB * MiB, "vmdk": vmdk.stat().st_size}}))
    if not keep_plain:
        vmdk.unlink()
    return vmx


def transferred(text: str) -> list[str]:
    sub = htcondor2.Submit(text)
    return [Path(f.strip()).name for f in sub["transfer_input_files"].split(",")]


@pytest.mark.parametrize("keep_plain", [True, False], ids=["as-built", "zst-only"])
def test_submit_ships_the_transport_form(keep_plain: bool, tmp_path: Path) -> None:
    vmx = transport_image(tmp_path / "image", keep_plain=keep_plain)
    plain = (tmp_path / "image" / "hello.vmdk.zst").stat().st_size
    text = render_submit(vmx, submit_dir=tmp_path / "submit")
    assert transferred(text) == ["hello.vmx", "hello.vmdk.zst"]
    assert "# The disk travels zstd-compressed (hello.vmdk.zst); the runner expands it" in text
    facts = image_facts(vmx)
    assert facts.disk_capacity_bytes == CAPACITY_MIB * MiB
    assert facts.transported == [tmp_path / "image" / "hello.vmdk.zst"]
    assert facts.size_bytes == vmx.stat().st_size + plain
    expanded = 16 * MiB  # at least the data written, plus grain tables and header
    assert expanded < facts.expanded_bytes < 2 * expanded
    # scratch: shipped + expansion + qcow2 copy (4x, capped by capacity) + 2 x memory + 1 GiB
    request = int(htcondor2.Submit(text)["request_disk"].rstrip("M"))
    least = (facts.size_bytes + facts.expanded_bytes + 2 * 2048 * MiB + 1024 * MiB) // MiB
    assert least < request <= least + CAPACITY_MIB + 1


def test_capacity_from_the_manifest_without_zstd(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit host without zstd cannot read the stream's header: the manifest says."""
    vmx = transport_image(tmp_path / "image", keep_plain=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    facts = image_facts(vmx)
    assert facts.disk_capacity_bytes == CAPACITY_MIB * MiB
    assert [p.name for p in facts.files] == ["hello.vmx", "hello.vmdk.zst"]


def test_old_images_still_ship_their_vmdk(tmp_path: Path) -> None:
    vmx = make_image(tmp_path / "image")
    text = render_submit(vmx, submit_dir=tmp_path)
    assert transferred(text) == ["hello.vmx", "hello.vmdk", "hello-flat.vmdk"]
    assert "zstd" not in text
    assert image_facts(vmx).expanded_bytes == 0


def test_sbatch_copies_the_transport_form(tmp_path: Path) -> None:
    vmx = transport_image(tmp_path / "image")
    text = render_sbatch(vmx, script_dir=tmp_path)
    (tmp_path / "check.sbatch").write_text(text)
    subprocess.run(["bash", "-n", str(tmp_path / "check.sbatch")], check=True)
    image = shlex.quote(str(tmp_path / "image"))
    assert f"cp -- {image}/hello.vmx {image}/hello.vmdk.zst \"$image.part\"/" in text
    assert " run \"$image\"/hello.vmx --workdir \"$work\"" in text
    assert 'rm -rf -- "$work" "$image"' in text
    old = render_sbatch(make_image(tmp_path / "old"), script_dir=tmp_path)
    assert "$image" not in old and f"run {tmp_path / 'old' / 'hello.vmx'}" in old


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_copy_survives_the_requeue(tmp_path: Path) -> None:
    """Run under bash as sbatch would (a fake runner in place of the bundle): the job's copy
    holds the .vmx and the .zst, never the VMDK; the requeued job reuses it; the finished
    job removes it with the work directory."""
    vmx = transport_image(tmp_path / "image")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").chmod(0o755)
    options = SubmitOptions(python=sys.executable, bundle=str(FAKE),
                            work_root=str(tmp_path / "work"),
                            runner_args=("--count", "20", "--interval", "0.1",
                                         "--save-seconds", "0.3"))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(vmx, options, script_dir=tmp_path))
    env = {**os.environ, "SLURM_JOB_ID": "77", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    copy = tmp_path / "work" / "77.image"

    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 85, out
    assert sorted(p.name for p in copy.iterdir()) == ["hello.vmdk.zst", "hello.vmx"]
    assert not (tmp_path / "work" / "77.image.part").exists()

    (tmp_path / "image" / "hello.vmdk.zst").unlink()  # a second copy would fail now
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "fake-runner: resumed at" in again.stdout
    assert not copy.exists() and not (tmp_path / "work" / "77").exists()
