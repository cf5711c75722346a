"""The boot path a job image keeps (issue 9): what it leaves out, and that the seal gets it.

A booted image proving the masks took effect is in tests/test_build_e2e.py (slow)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from vmbuild.recipe import load_recipe
from vmbuild.stages import bootpath, kernel_modules
from vmbuild.stages.playbook import write_system_overlay

NETWORK_UNITS = {item.unit for item in bootpath.NETWORK}


def recipe(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nname: lean\njob:\n  command: [/bin/true]\n" + extra)
    return path


@pytest.mark.parametrize(("extra", "network"), [
    ("", False),
    ("  network: true\n", True),
    ("guest:\n  ssh: true\n", True),  # an sshd needs the network
])
def test_network_units_stay_only_when_the_recipe_needs_a_network(
        tmp_path: Path, extra: str, network: bool) -> None:
    units = {item.unit for item in bootpath.left_out(load_recipe(recipe(tmp_path, extra)))}
    assert "getty.target" in units and "timers.target" in units
    assert units & NETWORK_UNITS == (set() if network else NETWORK_UNITS)


def test_every_left_out_unit_says_why_and_the_overlay_carries_the_list(tmp_path: Path) -> None:
    r = load_recipe(recipe(tmp_path))
    entries = bootpath.manifest_entry(r)
    assert all(e["why"] and e["unit"] for e in entries)
    assert len({e["unit"] for e in entries}) == len(entries)
    # Never the job's own unit, nor what it needs to run and power off.
    kept = {"vmbuild-job.service", "systemd-journald.service", "systemd-journald.socket",
            "dbus.socket", "systemd-fstab-generator", "sysinit.target"}
    assert not kept & {e["unit"] for e in entries}
    assert {e["how"] for e in entries} <= {bootpath.MASKED, bootpath.ON_DEMAND,
                                           bootpath.UNLESS_MODULES_LISTED}
    items = bootpath.left_out(r)
    assert all(path.startswith("/") for item in items for path in item.removes)
    assert [e.get("removes", []) for e in entries] == [list(item.removes) for item in items]
    overlay = tmp_path / "system.tar"
    write_system_overlay(r, overlay)
    with tarfile.open(overlay) as tar:
        member = tar.extractfile(bootpath.LEFT_OUT_FILE.lstrip("/"))
        assert member is not None
        listed = [line.split(" ") for line in member.read().decode().splitlines()]
    assert listed == [line for item in items for line in
                      [[item.how, item.unit], *([bootpath.REMOVED, p] for p in item.removes)]]
    # udev's hardware database leaves with its update service.
    hwdb = next(item for item in items if item.unit == "systemd-hwdb-update.service")
    assert "/usr/lib/udev/hwdb.bin" in hwdb.removes
    # Every kind of line is one the seal knows.
    seal = (Path(bootpath.__file__).parents[1] / "guest" / "vmbuild-seal").read_text()
    assert all(f"    {how}:" in seal for how, _ in listed)


def test_logind_is_left_out_and_dbus_starts_on_demand(tmp_path: Path) -> None:
    units = {item.unit: item.how
             for item in bootpath.left_out(load_recipe(recipe(tmp_path)))}
    # The wrapper handles the ACPI power button itself (tests/test_guest_wrapper.py).
    assert units["systemd-logind.service"] == bootpath.MASKED
    assert units["dbus.service"] == bootpath.ON_DEMAND  # started by its socket, never masked


UDEV_UNITS = {item.unit for item in bootpath.UDEV}


@pytest.mark.parametrize(("extra", "udev"), [
    ("", False),
    ("  network: true\n", True),  # systemd-networkd manages links through udev
    ("guest:\n  ssh: true\n", True),
    ("guest:\n  vmware_tools: true\n", True),
])
def test_udev_stays_only_for_a_network_or_vmware_tools(
        tmp_path: Path, extra: str, udev: bool) -> None:
    units = {item.unit for item in bootpath.left_out(load_recipe(recipe(tmp_path, extra)))}
    assert "systemd-udevd.service" in UDEV_UNITS
    assert units & UDEV_UNITS == (set() if udev else UDEV_UNITS)


def test_the_job_unit_waits_for_nothing_it_does_not_use(tmp_path: Path) -> None:
    """Not after sysinit.target (udev, journald, tmpfiles start beside it); the root is
    mounted read-write by the kernel command line instead of waiting for systemd's remount."""
    from vmbuild.stages.disk import DiskLayout, grub_cfg

    unit = (Path(bootpath.__file__).parents[1] / "guest" / "vmbuild-job.service").read_text()
    after = [line for line in unit.splitlines() if line.startswith("After=")]
    assert after == ["After=systemd-journald.socket systemd-modules-load.service "
                     "systemd-sysctl.service"]
    assert "DefaultDependencies=no" in unit
    # What it waits for runs at its weight (on one vCPU beside journald, remount, tmpfiles).
    waited = [u for u in after[0].removeprefix("After=").split() if u.endswith(".service")]
    assert tuple(waited) == bootpath.JOB_WAITS_FOR
    assert f"CPUWeight={bootpath.JOB_CPU_WEIGHT}\n" in unit
    assert f"CPUWeight={bootpath.JOB_CPU_WEIGHT}\n".encode() in bootpath.job_first_dropin()
    assert not [line for line in unit.splitlines()
                if line.startswith(("Requires=", "Wants=")) and "sysinit" in line]
    layout = DiskLayout(1 << 30, "bios", 1 << 20, (1 << 30) - (1 << 20), "0" * 8)
    assert " rw " in grub_cfg(layout, "quiet") and " ro " not in grub_cfg(layout, "quiet")
    overlay = tmp_path / "system.tar"
    write_system_overlay(load_recipe(recipe(tmp_path)), overlay)
    with tarfile.open(overlay) as tar:
        for service in bootpath.JOB_WAITS_FOR:
            member = tar.extractfile(f"etc/systemd/system/{service}.d/vmbuild-job-first.conf")
            assert member is not None and member.read() == bootpath.job_first_dropin()


def test_bios_boots_the_kernel_with_the_16_bit_protocol() -> None:
    """GRUB's `linux` on BIOS moves the staged kernel byte by byte at boot (3.5 s under TCG);
    `linux16` does not. UEFI keeps `linux`."""
    from dataclasses import replace

    from vmbuild.stages.disk import DiskLayout, grub_cfg

    bios = DiskLayout(1 << 30, "bios", 1 << 20, (1 << 30) - (1 << 20), "0" * 8)
    lines = [line.split()[0] for line in grub_cfg(bios, "quiet").splitlines()]
    assert lines.index("insmod") < lines.index("menuentry")
    assert "linux16" in lines and "initrd16" in lines and "linux" not in lines
    efi = [line.split()[0] for line in grub_cfg(replace(bios, firmware="efi"), "q").splitlines()]
    assert "linux" in efi and "initrd" in efi and "linux16" not in efi


def test_kept_modules_follow_the_hardware_and_the_recipe(tmp_path: Path) -> None:
    plain = kernel_modules.kept_file(load_recipe(recipe(tmp_path))).decode().split()
    assert {"vmw_pvscsi", "nvme", "ahci", "fuse", "vmw_vmci"} <= set(plain)
    assert {"button", "evdev"} <= set(plain)  # the ACPI power button reaches the wrapper
    # The root's file system is a module of the generic kernel (sata, lsilogic): kept, and in
    # the shipped initramfs with every controller's driver.
    assert "ext4" in plain
    initramfs = kernel_modules.initramfs_file().decode().split()
    assert {"ext4", "vmw_pvscsi", "ahci", "sym53c8xx", "mptspi", "nvme", "sd_mod"} <= set(initramfs)
    assert "vmxnet3" in plain and "e1000" not in plain  # no network: no Intel card driver
    networked = kernel_modules.kept_file(load_recipe(recipe(
        tmp_path, "  network: true\nguest:\n  modules: [wireguard, fuse]\n"))).decode().split()
    assert {"e1000", "e1000e", "wireguard"} <= set(networked)
    assert len(networked) == len(set(networked))  # each name once (fuse is in both lists)
    overlay = tmp_path / "system.tar"
    write_system_overlay(load_recipe(recipe(tmp_path)), overlay)
    with tarfile.open(overlay) as tar:
        member = tar.extractfile(kernel_modules.KEPT_FILE.lstrip("/"))
        assert member is not None and member.read().decode().split() == plain


@pytest.mark.parametrize("init", ["systemd", "job"])
def test_only_a_guest_init_job_image_carries_vmbuild_init(tmp_path: Path, init: str) -> None:
    """The initramfs starts vmbuild-init when the image has it, so its presence is the
    choice: the default image has none and boots systemd."""
    from vmbuild.stages.playbook import JOB_INIT

    overlay = tmp_path / "system.tar"
    write_system_overlay(load_recipe(recipe(tmp_path, f"guest:\n  init: {init}\n")), overlay)
    with tarfile.open(overlay) as tar:
        names = tar.getnames()
        assert ("vmbuild-job.service" in " ".join(names))  # the unit stays either way
        if init == "systemd":
            assert JOB_INIT.lstrip("/") not in names
        else:
            member = tar.getmember(JOB_INIT.lstrip("/"))
            assert member.mode == 0o755
            script = tar.extractfile(member)
            assert script is not None and script.read().startswith(b"#!/bin/busybox sh\n")
    initramfs = (Path(__file__).parents[1] / "vmbuild" / "guest" / "vmbuild-initramfs").read_text()
    assert (f"[ -x /root{JOB_INIT} ] && [ -x /root/bin/busybox ] \\\n"
            f"        && init={JOB_INIT}") in initramfs
