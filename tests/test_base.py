"""The base stage's cache key, its rootless plumbing and the loop-device-free disk assembly
(fast, no VM, no root)."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmbuild.errors import UsageError
from vmbuild.recipe import Application, Guest, Job, Output, Recipe
from vmbuild.stages import base as basestage
from vmbuild.stages import disk as diskimage
from vmbuild.stages.base import (
    apt_sources,
    base_key,
    initramfs_hook_script,
    kernel_package,
    subordinate_range,
)
from vmbuild.tools import find_tool, tool_env


def recipe(**changes: object) -> Recipe:
    base = Recipe(path=Path("/r/recipe.yaml"), name="hello", guest=Guest(hostname="hello"),
                  application=Application(), job=Job(command=("echo", "hi")), output=Output())
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_key_ignores_everything_the_app_stage_applies() -> None:
    key = base_key(recipe())
    assert base_key(recipe(name="other")) == key
    assert base_key(recipe(job=Job(command=("true",), timeout=5.0))) == key
    assert base_key(recipe(application=Application(run=("make",)))) == key
    assert base_key(recipe(guest=Guest(hostname="elsewhere", timezone="Europe/Paris"))) == key


def test_key_follows_what_shapes_the_disk() -> None:
    key = base_key(recipe())
    assert base_key(recipe(guest=Guest(packages=("jq",)))) != key
    assert base_key(recipe(guest=Guest(firmware="efi"))) != key
    assert base_key(recipe(guest=Guest(disk=8 * 1024**3))) != key
    assert base_key(recipe(output=Output(disk_controller="sata"))) != key  # kernel flavour


def test_kernel_flavour_has_the_drivers_the_hardware_needs() -> None:
    assert kernel_package(recipe()) == "linux-image-cloud-amd64"  # pvscsi, nvme, vmxnet3
    assert kernel_package(recipe(output=Output(disk_controller="lsilogic"))) == \
        "linux-image-amd64"
    assert kernel_package(recipe(output=Output(disk_controller="sata"))) == "linux-image-amd64"
    with_e1000 = recipe(job=Job(command=("x",), network=True), output=Output(nic="e1000e"))
    assert kernel_package(with_e1000) == "linux-image-amd64"


def test_stable_releases_get_updates_and_security() -> None:
    sources = apt_sources("bookworm", "http://mirror.example/debian")
    assert sources[0] == "deb http://mirror.example/debian bookworm main"
    assert any("bookworm-security" in s for s in sources)
    assert apt_sources("sid", "http://m/debian") == ["deb http://m/debian sid main"]


def test_subordinate_ranges_are_read_like_newuidmap_does(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\nbob:165536:65536\n1002:231072:65536\n"
                      "bob:900000:65536\nbroken line\n")
    assert subordinate_range(subuid, "bob", 1001) == (165536, 65536)  # the first one
    assert subordinate_range(subuid, "carol", 1002) == (231072, 65536)  # by uid
    assert subordinate_range(subuid, "dave", 1003) is None
    assert subordinate_range(tmp_path / "absent", "bob", 1001) is None


def test_without_root_tree_work_runs_as_guest_root_in_a_user_namespace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(basestage, "_id_ranges", lambda: ((100000, 65536), (200000, 65536)))
    argv = basestage.as_guest_root(["mkfs.ext4", "-d", "/tree; rm -rf /"])
    assert Path(argv[0]).name == "unshare"
    assert argv[-4:] == ["--", "mkfs.ext4", "-d", "/tree; rm -rf /"]  # an argument list
    assert "--map-users=100000,0,65536" in argv and "--map-groups=200000,0,65536" in argv
    assert "--map-user=65536" in argv and "--setuid=0" in argv and "--setgid=0" in argv
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert basestage.as_guest_root(["true"]) == ["true"]


def test_without_subordinate_ids_the_error_says_how_to_add_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(pwd, "getpwuid",
                        lambda uid: type("P", (), {"pw_name": "nosubids"})())
    with pytest.raises(UsageError, match="usermod --add-subuids"):
        basestage._id_ranges()


def test_sbin_tools_are_found_from_an_ordinary_users_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    if Path("/usr/sbin/sfdisk").exists() or Path("/sbin/sfdisk").exists():
        assert find_tool("sfdisk") is not None
    assert tool_env()["PATH"].split(":")[:3] == ["/usr/local/bin", "/usr/bin", "/bin"]
    assert "/usr/sbin" in tool_env()["PATH"].split(":")


needs_tools = pytest.mark.skipif(
    not all(find_tool(t) for t in ("sfdisk", "mkfs.ext4", "grub-mkimage", "debugfs")),
    reason="disk tools missing (scripts/setup.sh installs them)")


def _partition_table(disk: Path) -> dict[str, Any]:
    proc = subprocess.run([find_tool("sfdisk") or "sfdisk", "--json", str(disk)],
                          capture_output=True, text=True, check=True)
    table: dict[str, Any] = json.loads(proc.stdout)["partitiontable"]
    return table


def _assembled(tmp_path: Path, firmware: str,
               dev: bool = False) -> tuple[Path, diskimage.DiskLayout]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    if dev:  # a Debian tree as an ordinary user's mmdebstrap leaves it: /dev without nodes
        (root / "dev").mkdir()
        (root / "dev" / "pts").mkdir()
    (root / "etc" / "hello").write_text("from the tree\n")
    layout = diskimage.plan_layout(300 * 1024 * 1024, firmware)
    diskimage.install_grub_files(root, layout, "console=ttyS0")
    disk = tmp_path / "disk.raw"
    diskimage.assemble_disk(root, disk, layout)
    return disk, layout


_DEBUGFS = find_tool("debugfs") or "debugfs"


@needs_tools
def test_bios_disk_has_grub_in_the_mbr_and_the_tree_in_ext4(tmp_path: Path) -> None:
    disk, layout = _assembled(tmp_path, "bios")

    table = _partition_table(disk)
    assert table["label"] == "dos"
    [part] = table["partitions"]
    assert part["start"] * 512 == layout.root_offset and part.get("bootable")
    mbr = disk.read_bytes()[:1024]
    assert mbr[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 1  # boot.img loads core.img from LBA 1
    assert mbr[0x66:0x68] == b"\x90\x90"
    fs = f"{disk}?offset={layout.root_offset}"
    cat = subprocess.run([_DEBUGFS, "-R", "cat /etc/hello", fs], capture_output=True,
                         text=True, check=True)
    assert cat.stdout == "from the tree\n"
    cfg = subprocess.run([_DEBUGFS, "-R", "cat /boot/grub/grub.cfg", fs],
                         capture_output=True, text=True, check=True).stdout
    assert f"root=UUID={layout.root_uuid}" in cfg


@needs_tools
def test_efi_disk_has_an_esp_with_the_removable_media_loader(tmp_path: Path) -> None:
    disk, layout = _assembled(tmp_path, "efi")
    table = _partition_table(disk)
    assert table["label"] == "gpt"
    assert table["partitions"][0]["type"].upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    esp = subprocess.run(["mdir", "-i", f"{disk}@@{layout.esp_offset}", "::/EFI/BOOT"],
                         capture_output=True, text=True, check=True)
    assert "BOOTX64" in esp.stdout


@needs_tools
def test_device_nodes_missing_from_the_tree_are_written_into_the_filesystem(
        tmp_path: Path) -> None:
    disk, layout = _assembled(tmp_path, "bios", dev=True)
    entries = diskimage.list_dir(disk, layout, "/dev")
    assert entries["null"] == (0o020666, 0, 0)
    assert entries["console"] == (0o020666, 0, 0)
    assert entries["fd"] == (0o120777, 0, 0)
    assert entries["shm"] == (0o040755, 0, 0)
    assert set(entries) == {name for name, *_ in diskimage.DEV_ENTRIES}
    fs = f"{disk}?offset={layout.root_offset}"
    stat = subprocess.run([_DEBUGFS, "-R", "stat /dev/urandom", fs], capture_output=True,
                          text=True, check=True).stdout
    assert "Device major/minor number: 01:09" in stat
    link = subprocess.run([_DEBUGFS, "-R", "stat /dev/stdin", fs], capture_output=True,
                          text=True, check=True).stdout
    assert 'Fast link dest: "/proc/self/fd/0"' in link
    fsck = subprocess.run([find_tool("e2fsck") or "e2fsck", "-fn", fs], capture_output=True,
                          text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout


@needs_tools
def test_a_tree_without_dev_gets_no_device_nodes(tmp_path: Path) -> None:
    disk, layout = _assembled(tmp_path, "bios")
    assert "dev" not in diskimage.list_dir(disk, layout, "/")


def test_initramfs_hook_adds_the_drivers_without_loading_them(tmp_path: Path) -> None:
    """The controllers' drivers go into the initramfs through a hook (added, loaded by udev
    only when the device is there), never through modules.d (loaded at every boot)."""
    script = initramfs_hook_script(("vmw_pvscsi", "ahci", "odd name"))
    assert script.startswith("#!/bin/sh\n")
    assert "manual_add_modules vmw_pvscsi ahci 'odd name'\n" in script
    hook = tmp_path / "hook"
    hook.write_text(script)
    prereqs = subprocess.run(["sh", str(hook), "prereqs"], capture_output=True, text=True)
    assert prereqs.returncode == 0 and prereqs.stdout.strip() == ""
