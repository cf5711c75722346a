"""The base stage's cache key and the loop-device-free disk assembly (fast, no VM)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmbuild.recipe import Application, Guest, Job, Output, Recipe
from vmbuild.stages import disk as diskimage
from vmbuild.stages.base import apt_sources, base_key, kernel_package


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


needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sfdisk", "mkfs.ext4", "grub-mkimage", "debugfs")),
    reason="disk tools missing (scripts/setup.sh installs them)")


def _partition_table(disk: Path) -> dict[str, Any]:
    proc = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                          check=True)
    table: dict[str, Any] = json.loads(proc.stdout)["partitiontable"]
    return table


def _assembled(tmp_path: Path, firmware: str) -> tuple[Path, diskimage.DiskLayout]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_text("from the tree\n")
    layout = diskimage.plan_layout(300 * 1024 * 1024, firmware)
    diskimage.install_grub_files(root, layout, "console=ttyS0")
    disk = tmp_path / "disk.raw"
    diskimage.assemble_disk(root, disk, layout)
    return disk, layout


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
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hello", fs], capture_output=True,
                         text=True, check=True)
    assert cat.stdout == "from the tree\n"
    cfg = subprocess.run(["debugfs", "-R", "cat /boot/grub/grub.cfg", fs],
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
