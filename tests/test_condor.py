"""HTCondor submit descriptions, parsed by HTCondor's own parser (htcondor2.Submit)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import classad2
import htcondor2
import pytest

from tests.scheduler_images import make_image
from vmbuild.schedulers import (
    SchedulerError,
    SubmitOptions,
    render_submit,
    suspend_seconds,
    write_submission,
)

# htcondor is in the dev extra: a missing one is a broken set-up, an ImportError, not a skip.

OPTION_SETS: dict[str, SubmitOptions] = {
    "default": SubmitOptions(),
    "qemu-kvm": SubmitOptions(backend="qemu", require_kvm=True, min_probe_version="0.1"),
    "vmware-sigterm": SubmitOptions(backend="vmware", kill_sig="SIGTERM"),
    "periodic": SubmitOptions(checkpoint_every="30m", measured_suspend_s=200.0),
    "extra": SubmitOptions(extra=('+ProjectName = "vmbuild"', "max_retries = 3"), queue=3),
}


def _submit(text: str) -> Any:
    return htcondor2.Submit(text)


def _files(value: str) -> list[str]:
    return [f.strip() for f in value.split(",") if f.strip()]


def _eval_requirements(expr: str, machine: dict[str, Any]) -> bool:
    ad = classad2.ClassAd()
    for key, value in machine.items():
        ad[key] = value
    ad["vmbuild_req"] = classad2.ExprTree(expr.replace("TARGET.", ""))
    return bool(ad.eval("vmbuild_req") is True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "image", memory_mib=4096, cpus=2)


@pytest.mark.parametrize("label", sorted(OPTION_SETS))
def test_every_submit_file_parses_and_keeps_the_contract(image: Path, tmp_path: Path,
                                                         label: str) -> None:
    options = OPTION_SETS[label]
    text = render_submit(image, options, submit_dir=tmp_path / "submit")
    sub = _submit(text)
    assert sub["universe"] == "vanilla"
    assert sub["executable"] == "vmbuild-run.pyz"
    assert sub["kill_sig"] == options.kill_sig
    assert int(sub["job_max_vacate_time"]) == options.estimate(4096).seconds
    assert sub["when_to_transfer_output"] == "ON_EXIT_OR_EVICT"
    assert sub["should_transfer_files"] == "YES"
    assert sub["checkpoint_exit_code"] == "85"
    inputs = _files(sub["transfer_input_files"])
    assert any(f.endswith("hello.vmx") for f in inputs)
    assert any(f.endswith("hello.vmdk") for f in inputs)
    assert any(f.endswith("hello-flat.vmdk") for f in inputs)  # a descriptor's extent too
    for key in ("transfer_output_files", "transfer_checkpoint_files"):
        listed = _files(sub[key])
        assert listed, key
        assert not [f for f in listed if f.endswith((".vmdk", ".vmx"))], (key, listed)
    assert sub["transfer_checkpoint_files"] == sub["transfer_output_files"]
    args = sub.expand("arguments").strip('"').split()
    assert args[:2] == ["run", "hello.vmx"]
    workdir = args[args.index("--workdir") + 1]
    assert workdir.startswith(sub.expand("transfer_output_files") + "/")  # travels back
    assert sub["request_cpus"] == "2"
    assert sub["request_memory"] == f"{4096 + options.memory_overhead_mib}M"
    assert int(sub["request_disk"].rstrip("M")) > 2 * 4096  # two memory states at least
    assert sub["MY.WantIOProxy"] == "true"
    assert sub["MY.VmbuildImage"] == '"hello"'
    for key in ("log", "output", "error"):
        assert sub[key].startswith("hello.$(Cluster)")
    if options.checkpoint_every:
        assert "--checkpoint-every" in args


def test_vacate_time_grows_with_memory(tmp_path: Path) -> None:
    times = []
    for memory in (1024, 8192, 32768):
        vmx = make_image(tmp_path / f"m{memory}", memory_mib=memory)
        sub = _submit(render_submit(vmx, SubmitOptions(), submit_dir=tmp_path))
        times.append(int(sub["job_max_vacate_time"]))
    assert times == sorted(times) and len(set(times)) == 3, times
    # 32 GiB at 100 MiB/s is 328 s to write; the margin doubles it.
    assert times[-1] >= 2 * 32768 / 100


def test_vacate_time_never_below_measured_or_floor(image: Path, tmp_path: Path) -> None:
    measured = _submit(render_submit(image, SubmitOptions(measured_suspend_s=900),
                                     submit_dir=tmp_path))
    assert int(measured["job_max_vacate_time"]) >= 900
    fast = _submit(render_submit(image, SubmitOptions(write_mib_s=100000, suspend_floor_s=45),
                                 submit_dir=tmp_path))
    assert int(fast["job_max_vacate_time"]) == 45
    assert suspend_seconds(4096, write_mib_s=100, overhead_s=0, margin=1, floor_s=0) == 41


def _vmware_node(product: str = "workstation", max_hw: int = 21,
                 x86: bool = True) -> dict[str, Any]:
    """A machine ad as the probe writes it for a VMware host (see test_probe)."""
    return {"VMBUILD_QEMU": False, "VMBUILD_VMWARE": x86, "VMBUILD_RUNNER_VERSION": "0.1.0",
            "VMBUILD_VMWARE_PRODUCT": product, "VMBUILD_VMWARE_VERSION": "17.5.0",
            "VMBUILD_VMWARE_MAX_HWVERSION": max_hw, "VMBUILD_VMWARE_X86": x86}


def test_requirements_match_probed_machines(image: Path, tmp_path: Path) -> None:
    default = _submit(render_submit(image, SubmitOptions(), submit_dir=tmp_path))["requirements"]
    qemu_node = {"VMBUILD_QEMU": True, "VMBUILD_VMWARE": False, "VMBUILD_KVM": False,
                 "VMBUILD_RUNNER_VERSION": "0.1.0"}
    vmware_node = _vmware_node()
    bare_node = {"VMBUILD_QEMU": False, "VMBUILD_VMWARE": False,
                 "VMBUILD_RUNNER_VERSION": "0.1.0"}
    unprobed: dict[str, Any] = {"Memory": 4096}
    assert _eval_requirements(default, qemu_node)
    assert _eval_requirements(default, vmware_node)
    assert not _eval_requirements(default, bare_node)
    assert not _eval_requirements(default, unprobed)
    kvm = _submit(render_submit(image, OPTION_SETS["qemu-kvm"],
                                submit_dir=tmp_path))["requirements"]
    assert not _eval_requirements(kvm, qemu_node)
    assert _eval_requirements(kvm, {**qemu_node, "VMBUILD_KVM": True})
    assert not _eval_requirements(kvm, {**qemu_node, "VMBUILD_KVM": True,
                                        "VMBUILD_RUNNER_VERSION": "0.0.9"})
    assert not _eval_requirements(kvm, vmware_node)


@pytest.mark.parametrize("backend", ["vmware", None])
def test_vmware_hosts_must_run_the_image_hardware_version(tmp_path: Path,
                                                          backend: str | None) -> None:
    """The image is hw 19 (make_image): Workstation 16.2 (19) and later match, 16.0 (18)
    does not, nor does Fusion on Apple silicon, nor a probe too old to say its maximum."""
    image = make_image(tmp_path / "image")
    assert 'virtualHW.version = "19"' in image.read_text()
    req = _submit(render_submit(image, SubmitOptions(backend=backend),
                                submit_dir=tmp_path))["requirements"]
    assert _eval_requirements(req, _vmware_node(max_hw=19))
    assert _eval_requirements(req, _vmware_node(max_hw=21))
    assert not _eval_requirements(req, _vmware_node(max_hw=18))
    assert not _eval_requirements(req, _vmware_node("fusion", max_hw=21, x86=False))
    # Fusion on Apple silicon with a probe that still said VMBUILD_VMWARE = true:
    assert not _eval_requirements(req, {**_vmware_node("fusion", max_hw=21, x86=False),
                                        "VMBUILD_VMWARE": True})
    old_probe = {"VMBUILD_QEMU": False, "VMBUILD_VMWARE": True,
                 "VMBUILD_RUNNER_VERSION": "0.1.0"}
    assert not _eval_requirements(req, old_probe)
    # QEMU runs any hardware version: a QEMU machine still matches the default backend.
    qemu_node = {"VMBUILD_QEMU": True, "VMBUILD_VMWARE": False,
                 "VMBUILD_RUNNER_VERSION": "0.1.0"}
    assert _eval_requirements(req, qemu_node) == (backend is None)


def test_requirements_follow_the_image_hardware_version(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image")
    image.write_text(image.read_text().replace('virtualHW.version = "19"',
                                               'virtualHW.version = "21"'))
    req = _submit(render_submit(image, SubmitOptions(backend="vmware"),
                                submit_dir=tmp_path))["requirements"]
    assert "VMBUILD_VMWARE_MAX_HWVERSION >= 21" in req
    assert not _eval_requirements(req, _vmware_node(max_hw=20))  # Workstation 17.0
    assert _eval_requirements(req, _vmware_node(max_hw=21))      # Workstation 17.5


def test_requirements_against_the_probe_own_lines(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe, on a host with fake `vmware` and `vmrun`, writes a machine ad that the
    submit file's requirements accept for a hw-19 image (Workstation 16.2.5 -> 19)."""
    from vmbuild.runner import probe

    for name, script in (
        ("vmrun", "echo 'vmrun version 1.17.0 build-20800274'"),
        ("vmware", "echo 'VMware Workstation 16.2.5 build-20904516'"),
    ):
        tool = tmp_path / "bin" / name
        tool.parent.mkdir(exist_ok=True)
        tool.write_text(f"#!/bin/sh\n{script}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    ad = classad2.parseOne("\n".join(probe.probe_lines(check_kvm=False)))
    assert ad["VMBUILD_VMWARE_MAX_HWVERSION"] == 19
    image = make_image(tmp_path / "image")
    req = _submit(render_submit(image, SubmitOptions(backend="vmware"),
                                submit_dir=tmp_path))["requirements"]
    ad["vmbuild_req"] = classad2.ExprTree(req.replace("TARGET.", ""))
    assert ad.eval("vmbuild_req") is True
    image.write_text(image.read_text().replace('virtualHW.version = "19"',
                                               'virtualHW.version = "20"'))
    req20 = _submit(render_submit(image, SubmitOptions(backend="vmware"),
                                  submit_dir=tmp_path))["requirements"]
    ad["vmbuild_req"] = classad2.ExprTree(req20.replace("TARGET.", ""))
    assert ad.eval("vmbuild_req") is not True


def test_queue_items_and_inputs(image: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "shared.cfg").write_text("x")
    items = []
    for n in range(3):
        item = data / f"case{n}.txt"
        item.write_text(str(n))
        items.append(str(item))
    options = SubmitOptions(inputs=(data / "shared.cfg",), item_inputs=tuple(items), queue=2)
    sub = _submit(render_submit(image, options, submit_dir=tmp_path / "submit"))
    assert sub.getQArgs().startswith("2 vmbuild_input from")
    assert [d["vmbuild_input"] for d in sub.itemdata()] == \
        [f"../data/case{n}.txt" for n in range(3)]
    sub["vmbuild_input"] = "../data/case1.txt"
    args = sub.expand("arguments").strip('"').split()
    assert args[-4:] == ["--input", "shared.cfg", "--input", "case1.txt"]
    inputs = _files(sub.expand("transfer_input_files"))
    assert "../data/shared.cfg" in inputs and "../data/case1.txt" in inputs


def test_bad_options_are_refused(image: Path, tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="kill signal"):
        render_submit(image, SubmitOptions(kill_sig="SIGKILL"), submit_dir=tmp_path)
    with pytest.raises(SchedulerError, match="key = value"):
        render_submit(image, SubmitOptions(extra=("nonsense",)), submit_dir=tmp_path)
    with pytest.raises(SchedulerError, match="queue"):
        render_submit(image, SubmitOptions(extra=("queue = 3",)), submit_dir=tmp_path)
    spaced = tmp_path / "with space.txt"
    spaced.write_text("x")
    with pytest.raises(SchedulerError, match="white space"):
        render_submit(image, SubmitOptions(inputs=(spaced,)), submit_dir=tmp_path)
    with pytest.raises(SchedulerError, match="no such file"):
        render_submit(tmp_path / "missing.vmx", submit_dir=tmp_path)


def test_write_submission_writes_submit_file_and_bundle(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "condor"
    files = write_submission(image, "condor", out)
    assert files[0] == out / "hello.sub"
    _submit(files[0].read_text())
    assert files == [out / "hello.sub", out / "vmbuild-run.pyz"]
    assert files[1].read_bytes().startswith(b"#!/usr/bin/env python3")


def test_job_env_and_chirp_interval_reach_the_runner(image: Path, tmp_path: Path) -> None:
    sub = _submit(render_submit(image, SubmitOptions(job_env=("COUNT=40", "MODE=a b"),
                                                     chirp_interval="15s"),
                                submit_dir=tmp_path))
    args = sub["arguments"]
    assert "--env COUNT=40" in args and "--env 'MODE=a b'" in args
    assert "--chirp-interval 15s" in args
