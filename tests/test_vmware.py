"""Tests for the .vmx reader/writer, the QEMU device translation and the VMware lint.

Real VMDKs come from ``qemu-img`` (the same tool the build uses), made once per session from
a raw file with a few MiB of incompressible data spread over it, so both subformats have
many grains and a truncated copy really loses data the grain tables still point to.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmbuild.recipe import Application, Guest, Job, Output, Recipe
from vmbuild.runner.qemu_devices import ExtraDrive, find_ovmf, qemu_argv, qemu_opt_escape
from vmbuild.runner.vmx import (
    VmxDisk,
    VmxError,
    VmxNic,
    VmxSerial,
    controller_prefix,
    dump_vmx,
    free_units,
    load_vmx,
    parse_vmx,
    vmx_disks,
    vmx_escape,
    vmx_info,
    vmx_unescape,
)
from vmbuild.stages.artifact import inspect_vmdk, lint_vmdk, lint_vmx, render_vmx

QEMU_IMG = shutil.which("qemu-img")
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

MiB = 1024**2


def make_recipe(
    tmp_path: Path,
    *,
    controller: str = "pvscsi",
    firmware: str = "bios",
    network: bool = False,
    nic: str = "vmxnet3",
    hardware_version: int = 19,
    guest_os: str = "debian12-64",
    memory: int = 512 * MiB,
) -> Recipe:
    return Recipe(
        path=tmp_path / "recipe.yaml",
        name="hello",
        guest=Guest(firmware=firmware, memory=memory, cpus=2),
        application=Application(),
        job=Job(command=("/bin/true",), network=network),
        output=Output(
            hardware_version=hardware_version,
            guest_os=guest_os,
            disk_controller=controller,
            nic=nic,
        ),
    )


# --------------------------------------------------------------------------- disk fixtures


def _qemu_img(*args: str) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference VMDKs: 'sparse' and 'stream' converted from data, 'empty' created."""
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed")
    root = tmp_path_factory.mktemp("vmdks")
    raw = root / "source.raw"
    with raw.open("wb") as f:
        f.truncate(16 * MiB)
        for mib in range(0, 16, 2):  # 256 KiB of random data every other MiB
            f.seek(mib * MiB + 4096)
            f.write(os.urandom(256 * 1024))
    result = {
        "sparse": root / "sparse.vmdk",
        "stream": root / "stream.vmdk",
        "empty": root / "empty.vmdk",
    }
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
              str(raw), str(result["sparse"]))
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
              str(raw), str(result["stream"]))
    _qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse",
              str(result["empty"]), "64M")
    return result


@pytest.fixture
def image(tmp_path: Path, disks: dict[str, Path]) -> Callable[..., Path]:
    """Write an image directory (vmx + a copy of a reference disk); returns the .vmx path."""

    def make(kind: str = "sparse", **recipe_args: Any) -> Path:
        vmdk = tmp_path / "hello.vmdk"
        shutil.copyfile(disks[kind], vmdk)
        vmx = tmp_path / "hello.vmx"
        vmx.write_text(render_vmx(make_recipe(tmp_path, **recipe_args), vmdk.name),
                       encoding="utf-8")
        return vmx

    return make


# --------------------------------------------------------------------------- .vmx text


def test_dump_parse_round_trip_with_escaping() -> None:
    mapping = {
        "displayName": 'say "hi" | bye',
        "annotation": "line one\nline two\ttabbed\r",
        "guestinfo.unicode": "café – naïve \u2028 sep \x7f del",
        "guestinfo.hash": "# not a comment",
        "guestinfo.empty": "",
        "guestinfo.pipe-ish": "|22 literally",
    }
    text = dump_vmx(mapping)
    lines = text.splitlines()
    assert lines[0] == '.encoding = "UTF-8"'
    assert 'displayName = "say |22hi|22 |7C bye"' in lines
    assert 'annotation = "line one|0Aline two|09tabbed|0D"' in lines
    assert "café – naïve |E2|80|A8 sep |7F del" in text  # printable non-ASCII stays literal
    assert all(len(line.split('"')) == 3 for line in lines)  # one quoted value per line
    parsed = parse_vmx(text)
    assert parsed == {".encoding": "UTF-8", **{k.lower(): v for k, v in mapping.items()}}
    assert list(parsed)[1:] == [k.lower() for k in mapping]  # order kept
    assert dump_vmx(parsed) == dump_vmx({k.lower(): v for k, v in mapping.items()})


def test_escape_helpers() -> None:
    assert vmx_escape("plain text, fine") == "plain text, fine"
    assert vmx_unescape("a|7Cb|22c") == 'a|b"c'
    assert vmx_unescape("|C3|A9") == "é"  # multi-byte UTF-8 decoded as a run
    assert vmx_unescape("|E9", "cp1252") == "é"
    assert vmx_unescape("|E9") == "é"  # invalid UTF-8 falls back to Latin-1
    assert vmx_unescape("a|zz|7") == "a|zz|7"  # not an escape: kept literally


def test_parse_comments_case_duplicates_and_unquoted() -> None:
    text = (
        "\ufeff# a comment\n"
        "\n"
        '.encoding = "UTF-8"\n'
        'DisplayName = "first"   # trailing comment\n'
        "memsize=1024\n"
        '   displayname   =   "second"\n'
        'scsi0:0.fileName = "disk #1.vmdk"\n'
    )
    parsed = parse_vmx(text)
    assert parsed == {
        ".encoding": "UTF-8",
        "displayname": "second",
        "memsize": "1024",
        "scsi0:0.filename": "disk #1.vmdk",
    }
    assert list(parsed) == [".encoding", "displayname", "memsize", "scsi0:0.filename"]


@pytest.mark.parametrize(
    "line",
    ['memsize "512"', 'memsize = "512', 'memsize = "512" junk', '= "x"', 'bad key = "x"'],
)
def test_parse_rejects_what_vmware_rejects(line: str) -> None:
    with pytest.raises(VmxError) as err:
        parse_vmx(f'.encoding = "UTF-8"\n{line}\n')
    assert err.value.line == 2
    assert "line 2" in str(err.value)


def test_dump_rejects_bad_and_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="not a valid"):
        dump_vmx({"bad key": "x"})
    with pytest.raises(ValueError, match="twice"):
        dump_vmx({"memsize": "4", "MemSize": "8"})
    text = dump_vmx({".encoding": "windows-1252", "a": True, "b": False, "c": 7})
    assert text == '.encoding = "UTF-8"\na = "TRUE"\nb = "FALSE"\nc = "7"\n'


def test_load_vmx_honours_declared_encoding(tmp_path: Path) -> None:
    path = tmp_path / "old.vmx"
    path.write_bytes('.encoding = "windows-1252"\ndisplayName = "Café |22x|22"\n'.encode("cp1252"))
    assert load_vmx(path)["displayname"] == 'Café "x"'
    bad = tmp_path / "bad.vmx"
    bad.write_bytes(b'.encoding = "UTF-8"\ndisplayName = "\xff"\n')
    with pytest.raises(VmxError, match="not valid utf-8"):
        load_vmx(bad)


def test_vmx_info_reads_devices() -> None:
    text = dump_vmx({
        "config.version": "8",
        "virtualHW.version": "14",
        "displayName": "x",
        "guestOS": "debian11-64",
        "firmware": "efi",
        "memsize": "2048",
        "numvcpus": "4",
        "scsi0.present": "TRUE",
        "scsi0.virtualDev": "lsilogic",
        "scsi0:1.present": "TRUE",
        "scsi0:1.fileName": "data.vmdk",
        "scsi0:0.present": "TRUE",
        "scsi0:0.fileName": "boot.vmdk",
        "scsi0:2.present": "FALSE",
        "scsi0:2.fileName": "gone.vmdk",
        "sata0.present": "TRUE",
        "sata0:0.present": "TRUE",
        "sata0:0.deviceType": "cdrom-image",
        "sata0:0.fileName": "tools.iso",
        "nvme0.present": "FALSE",
        "nvme0:0.present": "TRUE",
        "nvme0:0.fileName": "orphan.vmdk",
        "ethernet0.present": "TRUE",
        "ethernet0.virtualDev": "e1000e",
        "ethernet0.connectionType": "nat",
        "ethernet1.present": "FALSE",
        "serial1.present": "TRUE",
        "serial1.fileType": "file",
        "serial1.fileName": "job.log",
        "serial0.present": "TRUE",
        "serial0.fileType": "file",
        "serial0.fileName": "console.log",
    })
    info = vmx_info(parse_vmx(text))
    assert (info.memory_mib, info.cpus, info.firmware) == (2048, 4, "efi")
    assert (info.guest_os, info.hardware_version, info.display_name) == ("debian11-64", 14, "x")
    assert info.disks == [VmxDisk("lsilogic", 0, 0, "boot.vmdk"), VmxDisk("lsilogic", 0, 1,
                                                                          "data.vmdk")]
    assert info.disks[1].key == "scsi0:1"
    assert info.nics == [VmxNic(0, "e1000e", "nat")]
    assert info.serial_ports == [VmxSerial(0, "console.log"), VmxSerial(1, "job.log")]
    with pytest.raises(VmxError, match="memsize"):
        vmx_info({"virtualhw.version": "19"})


# --------------------------------------------------------------------------- render + lint

COMBINATIONS = [
    (controller, firmware, nic)
    for controller in ("pvscsi", "lsilogic", "sata", "nvme")
    for firmware in ("bios", "efi")
    for nic in (None, "vmxnet3", "e1000e", "e1000")
]


@needs_qemu_img
@pytest.mark.parametrize(("controller", "firmware", "nic"), COMBINATIONS)
@pytest.mark.parametrize("kind", ["sparse", "stream"])
def test_render_vmx_lints_clean(
    image: Callable[..., Path], kind: str, controller: str, firmware: str, nic: str | None
) -> None:
    vmx = image(kind, controller=controller, firmware=firmware, network=nic is not None,
                nic=nic or "vmxnet3")
    assert lint_vmx(vmx) == []
    mapping = load_vmx(vmx)
    info = vmx_info(mapping)
    assert info.disks == [VmxDisk(controller, 0, 0, "hello.vmdk")]
    assert info.firmware == firmware
    assert ("firmware" in mapping) == (firmware == "efi")
    assert info.nics == ([VmxNic(0, nic, "nat")] if nic else [])
    assert info.serial_ports == [VmxSerial(0, "console.log"), VmxSerial(1, "job.log"),
                                 VmxSerial(2, "control.log")]
    assert (info.memory_mib, info.cpus, info.hardware_version) == (512, 2, 19)
    assert mapping["vmbuild.recipe"] == "hello"
    assert mapping["floppy0.present"] == "FALSE"
    assert mapping["tools.synctime"] == "FALSE"
    assert mapping["serial2.yieldonmsrread"] == "TRUE"
    assert not any("cdrom" in value.lower() for value in mapping.values())
    assert vmx.read_text().startswith('.encoding = "UTF-8"\nconfig.version = "8"\n')


def test_render_vmx_refuses_impossible_hardware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nvme disk controller needs virtualHW\.version 13"):
        render_vmx(make_recipe(tmp_path, controller="nvme", hardware_version=11), "d.vmdk")
    with pytest.raises(ValueError, match="32-bit"):
        render_vmx(make_recipe(tmp_path, controller="nvme", guest_os="debian12"), "d.vmdk")
    with pytest.raises(ValueError, match="multiple of 4 MiB"):
        render_vmx(make_recipe(tmp_path, memory=513 * MiB), "d.vmdk")
    with pytest.raises(ValueError, match="plain file name"):
        render_vmx(make_recipe(tmp_path), "../d.vmdk")
    with pytest.raises(ValueError, match="disk_controller"):
        render_vmx(make_recipe(tmp_path, controller="buslogic"), "d.vmdk")


@needs_qemu_img
def test_lint_detects_missing_disk(image: Callable[..., Path]) -> None:
    vmx = image()
    (vmx.parent / "hello.vmdk").unlink()
    problems = lint_vmx(vmx)
    assert len(problems) == 1
    assert "hello.vmx: scsi0:0.fileName 'hello.vmdk' does not exist" in problems[0]


@needs_qemu_img
@pytest.mark.parametrize("kind", ["sparse", "stream"])
def test_lint_detects_truncated_vmdk(image: Callable[..., Path], kind: str) -> None:
    vmx = image(kind)
    vmdk = vmx.parent / "hello.vmdk"
    assert lint_vmdk(vmdk) == []
    size = vmdk.stat().st_size
    with vmdk.open("r+b") as f:
        f.truncate(size // 2 // 512 * 512)  # sector-aligned: only the grain walk can tell
    problems = lint_vmx(vmx)
    assert any("hello.vmdk" in p and "beyond the end of the file" in p and "truncated" in p
               for p in problems), problems
    with vmdk.open("r+b") as f:
        f.truncate(size // 2 + 100)
    assert any("not a whole number of sectors" in p for p in lint_vmdk(vmdk))


@needs_qemu_img
def test_lint_runs_qemu_img_check(image: Callable[..., Path], tmp_path: Path) -> None:
    vmdk = image().parent / "hello.vmdk"
    fake = tmp_path / "fake-qemu-img"
    fake.write_text("#!/bin/sh\necho 'ERROR: something qemu found' >&2\nexit 2\n")
    fake.chmod(0o755)
    problems = lint_vmdk(vmdk, qemu_img=str(fake))
    assert problems == ["hello.vmdk: qemu-img check failed: ERROR: something qemu found"]
    assert lint_vmdk(vmdk, qemu_img=None) == []


@needs_qemu_img
def test_lint_detects_missing_key_and_bad_values(image: Callable[..., Path]) -> None:
    vmx = image()
    mapping = load_vmx(vmx)
    del mapping["guestos"]
    mapping["virtualhw.version"] = "3"
    mapping["memsize"] = "513"
    mapping["numvcpus"] = "0"
    vmx.write_text(dump_vmx(mapping))
    problems = lint_vmx(vmx)
    assert "hello.vmx: guestOS is missing" in problems
    assert any("virtualHW.version '3'" in p for p in problems)
    assert any("memsize '513'" in p for p in problems)
    assert any("numvcpus '0'" in p for p in problems)


@needs_qemu_img
def test_lint_detects_hardware_version_too_low(image: Callable[..., Path]) -> None:
    vmx = image(controller="nvme", firmware="efi")
    mapping = load_vmx(vmx)
    mapping["virtualhw.version"] = "7"
    mapping["guestos"] = "debian12"
    vmx.write_text(dump_vmx(mapping))
    problems = lint_vmx(vmx)
    assert any("nvme disk controller needs virtualHW.version 13" in p for p in problems)
    assert any("efi firmware needs virtualHW.version 8" in p for p in problems)
    assert any("32-bit" in p for p in problems)
    mapping["virtualhw.version"] = "99"
    vmx.write_text(dump_vmx(mapping))
    assert any("virtualHW.version '99' is not a hardware version" in p for p in lint_vmx(vmx))


@needs_qemu_img
def test_lint_detects_unportable_paths_and_unknown_devices(image: Callable[..., Path]) -> None:
    vmx = image(network=True)
    text = vmx.read_text()
    text = text.replace('scsi0:0.fileName = "hello.vmdk"', 'scsi0:0.fileName = "/abs/hello.vmdk"')
    text = text.replace('fileName = "job.log"', 'fileName = "../job.log"')
    text = text.replace('"pvscsi"', '"megaraid"').replace('"vmxnet3"', '"tulip"')
    text += 'memsize = "512"\n'
    vmx.write_text(text)
    problems = lint_vmx(vmx)
    assert any("scsi0:0.fileName '/abs/hello.vmdk' is an absolute path" in p for p in problems)
    assert any("serial1.fileName '../job.log' leaves the image directory" in p
               for p in problems)
    assert any("scsi0.virtualDev 'megaraid'" in p for p in problems)
    assert any("ethernet0.virtualDev 'tulip'" in p for p in problems)
    assert any("memsize is set twice" in p for p in problems)


@needs_qemu_img
def test_lint_reports_disks_vmware_would_not_attach(image: Callable[..., Path]) -> None:
    """The runner once wrote its job disks as `lsilogic0:1.*` (the controller's type, not
    its key): VMware ignores such keys silently and the job lost its inputs and outputs.
    The lint names every disk VMware would not attach."""
    vmx = image(controller="lsilogic")
    shutil.copyfile(vmx.parent / "hello.vmdk", vmx.parent / "input.vmdk")
    with vmx.open("a") as f:
        f.write('lsilogic0:1.present = "TRUE"\nlsilogic0:1.fileName = "input.vmdk"\n'
                'scsi1:0.present = "TRUE"\nscsi1:0.fileName = "input.vmdk"\n'
                'sata1:0.fileName = "input.vmdk"\n'
                'scsi0:3.fileName = "input.vmdk"\n'
                'scsi0:20.present = "TRUE"\nscsi0:20.fileName = "input.vmdk"\n')
    problems = lint_vmx(vmx)
    assert any("lsilogic0:1.fileName names a disk under 'lsilogic0:1', which is not a "
               "device key VMware knows" in p for p in problems), problems
    assert "hello.vmx: scsi1:0 is present but its controller scsi1 is not" in problems
    assert ("hello.vmx: sata1:0.fileName names a disk on sata1, a controller that is not "
            "present; VMware would not attach it") in problems
    assert ("hello.vmx: scsi0:3.fileName names a disk but scsi0:3.present is not TRUE; "
            "VMware would not attach it") in problems
    assert "hello.vmx: scsi0:20: scsi controllers have units 0-15 only" in problems
    assert len(problems) == 5, problems


@needs_qemu_img
@pytest.mark.parametrize("controller", ["pvscsi", "lsilogic", "sata", "nvme"])
def test_lint_accepts_job_disks_under_the_controller_key(image: Callable[..., Path],
                                                         controller: str) -> None:
    """What the runner adds (the next free units of the boot controller) lints clean."""
    firmware = "efi" if controller == "nvme" else "bios"
    vmx = image(controller=controller, firmware=firmware)
    mapping = load_vmx(vmx)
    boot = vmx_disks(mapping)[0]
    shutil.copyfile(vmx.parent / "hello.vmdk", vmx.parent / "output.vmdk")
    units = list(free_units(mapping, controller_prefix(boot.controller), boot.bus))
    assert units[:2] == [1, 2]
    assert len(units) == {"pvscsi": 14, "lsilogic": 14, "sata": 29, "nvme": 14}[controller]
    key = VmxDisk(boot.controller, boot.bus, units[0], "output.vmdk").key
    with vmx.open("a") as f:
        f.write(f'{key}.present = "TRUE"\n{key}.fileName = "output.vmdk"\n')
    assert lint_vmx(vmx, qemu_img=None) == []


def test_lint_reports_unparsable_vmx(tmp_path: Path) -> None:
    vmx = tmp_path / "x.vmx"
    vmx.write_text('.encoding = "UTF-8"\nmemsize = "512\n')
    assert lint_vmx(vmx) == ["x.vmx: line 2: memsize: the value has no closing quote"]


# --------------------------------------------------------------------------- VMDK inspection


@needs_qemu_img
def test_inspect_vmdk_embedded(disks: dict[str, Path]) -> None:
    for kind, create_type in (("sparse", "monolithicSparse"), ("stream", "streamOptimized")):
        info = inspect_vmdk(disks[kind])
        assert info.problems == []
        assert info.create_type == create_type
        assert info.capacity == 16 * MiB
        assert info.adapter_type == "ide"  # qemu-img's default
        assert [(e.access, e.sectors, e.type, e.file_name) for e in info.extents] == [
            ("RW", 16 * MiB // 512, "SPARSE", disks[kind].name)
        ]
        assert info.header is not None and info.header.stream == (kind == "stream")
    assert inspect_vmdk(disks["empty"]).capacity == 64 * MiB
    assert lint_vmdk(disks["empty"]) == []


@needs_qemu_img
def test_inspect_and_lint_descriptor_files(tmp_path: Path) -> None:
    flat = tmp_path / "flat.vmdk"
    _qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "8M")
    info = inspect_vmdk(flat)
    assert info.problems == [] and info.header is None
    assert info.create_type == "monolithicFlat" and info.capacity == 8 * MiB
    assert [(e.type, e.file_name) for e in info.extents] == [("FLAT", "flat-flat.vmdk")]
    assert lint_vmdk(flat) == []
    with (tmp_path / "flat-flat.vmdk").open("r+b") as f:
        f.truncate(4 * MiB)
    assert any("shorter than" in p for p in lint_vmdk(flat))
    (tmp_path / "flat-flat.vmdk").unlink()
    assert any("'flat-flat.vmdk' does not exist" in p for p in lint_vmdk(flat))

    split = tmp_path / "split.vmdk"
    _qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(split), "3G")
    info = inspect_vmdk(split)
    assert info.create_type == "twoGbMaxExtentSparse" and len(info.extents) == 2
    assert lint_vmdk(split) == []


def test_inspect_vmdk_rejects_non_vmdk(tmp_path: Path) -> None:
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"\0" * 4096)
    assert any("not a VMDK" in p for p in inspect_vmdk(junk).problems)
    desc = tmp_path / "desc.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=12345678\n'
                    'createType="monolithicSparse"\nRW 100 FLAT "x.img" 0\n')
    problems = inspect_vmdk(desc).problems
    assert any("does not take FLAT extents" in p for p in problems)
    assert any("needs the descriptor embedded" in p for p in problems)
    assert any("delta disk" in p for p in problems)
    assert lint_vmdk(tmp_path / "nope.vmdk", qemu_img=None) == [
        "nope.vmdk: cannot be read: No such file or directory"
    ]


# --------------------------------------------------------------------------- QEMU argv


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


@pytest.mark.parametrize(
    ("controller", "devices"),
    [
        ("pvscsi", ["pvscsi,id=scsi0",
                    "scsi-hd,bus=scsi0.0,scsi-id=0,lun=0,drive=disk0,bootindex=0",
                    "scsi-hd,bus=scsi0.0,scsi-id=1,lun=0,drive=disk1"]),
        ("lsilogic", ["lsi53c895a,id=scsi0",
                      "scsi-hd,bus=scsi0.0,scsi-id=0,lun=0,drive=disk0,bootindex=0",
                      "scsi-hd,bus=scsi0.0,scsi-id=1,lun=0,drive=disk1"]),
        ("sata", ["ich9-ahci,id=sata0", "ide-hd,bus=sata0.0,drive=disk0,bootindex=0",
                  "ide-hd,bus=sata0.1,drive=disk1"]),
        ("nvme", ["nvme,id=nvme0,serial=vmbuild0,drive=disk0,bootindex=0",
                  "nvme,id=nvme1,serial=vmbuild1,drive=disk1"]),
    ],
)
def test_qemu_argv_per_controller(controller: str, devices: list[str]) -> None:
    info = vmx_info(parse_vmx(render_vmx(make_recipe(Path("/r"), controller=controller),
                                         "hello.vmdk")))
    argv = qemu_argv(info, Path("/img"), serial_paths=["/o/console.log", "/o/job,1.log",
                                                        "chardev:socket,path=/o/c.sock,server=on,wait=off"],
                     extra_drives=[("/o/out.img", "raw")])
    assert argv[:4] == ["-machine", "pc", "-accel", "tcg"]
    assert _pairs(argv, "-m") == ["512M"] and _pairs(argv, "-smp") == ["2"]
    assert "-nodefaults" in argv and _pairs(argv, "-display") == ["none"]
    assert "-bios" not in argv and "-netdev" not in argv
    assert _pairs(argv, "-drive") == [
        "file=/img/hello.vmdk,format=vmdk,if=none,id=disk0",
        "file=/o/out.img,format=raw,if=none,id=disk1",
    ]
    assert _pairs(argv, "-device") == devices
    ro = qemu_argv(info, Path("/img"), extra_drives=[ExtraDrive("/o/in.img", "raw", True)])
    assert _pairs(ro, "-drive")[1].endswith(",snapshot=on" if controller == "sata"
                                            else ",readonly=on")
    assert _pairs(argv, "-chardev") == [
        "file,id=serial0,path=/o/console.log",
        "file,id=serial1,path=/o/job,,1.log",
        "socket,path=/o/c.sock,server=on,wait=off,id=serial2",
    ]
    assert _pairs(argv, "-serial") == ["chardev:serial0", "chardev:serial1", "chardev:serial2"]


def test_qemu_argv_overrides_nics_firmware_and_default_serials(tmp_path: Path) -> None:
    ovmf = tmp_path / "OVMF.fd"
    ovmf.write_bytes(b"")
    info = vmx_info(parse_vmx(render_vmx(
        make_recipe(tmp_path, firmware="efi", network=True, nic="e1000e"), "hello.vmdk")))
    argv = qemu_argv(info, Path("/img"), disk_override={"hello.vmdk": "/run/top,x.qcow2"},
                     extra_drives=[ExtraDrive("/run/in.img", "raw", read_only=True)],
                     accel="kvm", ovmf_path=str(ovmf))
    assert _pairs(argv, "-accel") == ["kvm"]
    assert _pairs(argv, "-bios") == [str(ovmf)]
    assert _pairs(argv, "-drive") == [
        "file=/run/top,,x.qcow2,format=qcow2,if=none,id=disk0",
        "file=/run/in.img,format=raw,if=none,id=disk1,readonly=on",
    ]
    assert _pairs(argv, "-netdev") == ["user,id=net0"]
    assert "e1000e,netdev=net0" in _pairs(argv, "-device")
    assert _pairs(argv, "-chardev") == [  # the .vmx's own files, beside it
        "file,id=serial0,path=/img/console.log",
        "file,id=serial1,path=/img/job.log",
        "file,id=serial2,path=/img/control.log",
    ]
    argv = qemu_argv(info, Path("/img"), disk_override={"hello.vmdk": ("/run/l", "qcow2")},
                     ovmf_path=str(ovmf))
    assert _pairs(argv, "-drive")[0] == "file=/run/l,format=qcow2,if=none,id=disk0"
    with pytest.raises(ValueError, match="disk format"):
        qemu_argv(info, Path("/img"), disk_override={"hello.vmdk": "/run/l"},
                  ovmf_path=str(ovmf))


def test_qemu_opt_escape_and_find_ovmf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert qemu_opt_escape("a,b,,c") == "a,,b,,,,c"
    fake = tmp_path / "my-ovmf.fd"
    fake.write_bytes(b"")
    monkeypatch.setenv("VMBUILD_OVMF", str(fake))
    assert find_ovmf() == str(fake)
    monkeypatch.delenv("VMBUILD_OVMF")
    found = find_ovmf()
    assert found is None or Path(found).is_file()


# --------------------------------------------------------------------------- QEMU smoke


@pytest.mark.skipif(QEMU is None or QEMU_IMG is None, reason="QEMU is not installed")
@pytest.mark.parametrize("controller", ["pvscsi", "lsilogic", "sata", "nvme"])
def test_qemu_accepts_the_argv(image: Callable[..., Path], tmp_path: Path,
                               controller: str) -> None:
    """QEMU itself accepts every device line (it exits at once on a bad one)."""
    vmx = image(controller=controller, network=True,
                firmware="efi" if controller == "nvme" and find_ovmf() else "bios")
    info = vmx_info(load_vmx(vmx))
    out = tmp_path / "out.img"
    out.write_bytes(b"\0" * MiB)
    inputs = tmp_path / "in,puts.img"  # a comma in a path must survive
    inputs.write_bytes(b"\1" * MiB)
    argv = qemu_argv(info, vmx.parent, extra_drives=[(str(out), "raw"),
                                                     ExtraDrive(str(inputs), "raw", True)])
    assert QEMU is not None
    proc = subprocess.Popen([QEMU, *argv, "-S", "-no-reboot"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        still_running = proc.poll() is None
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
    assert still_running, stderr.decode()
    assert inputs.read_bytes() == b"\1" * MiB


# --------------------------------------------------------------------------- VMware-style stream


def _write_stream_with_footer(path: Path, grains: dict[int, bytes], capacity: int) -> None:
    """Write a streamOptimized VMDK the way VMware does (QEMU keeps the GD at the start):
    header with gdOffset = GD_AT_END, compressed grains behind markers, GT/GD markers, then
    the footer and the end-of-stream marker. QEMU reads this layout, which checks the test's
    own construction."""
    grain_sectors = 128
    descriptor = (
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
        'createType="streamOptimized"\n\n'
        f'RW {capacity // 512} SPARSE "{path.name}"\n\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "4"\n'
    ).encode().ljust(1024, b"\0")

    def header(gd_offset: int) -> bytes:
        fields = struct.pack(
            "<4sIIQQQQIQQQB4sH", b"KDMV", 3, 0x30001, capacity // 512, grain_sectors, 1, 2,
            512, 0, gd_offset, 3, 0, b"\n \r\n", 1,
        )
        return fields.ljust(512, b"\0")

    def marker(val: int, kind: int) -> bytes:
        return struct.pack("<QII", val, 0, kind).ljust(512, b"\0")

    body = bytearray(header(0xFFFFFFFFFFFFFFFF) + descriptor)
    table = [0] * 512
    for index, data in sorted(grains.items()):
        table[index] = len(body) // 512
        packed = zlib.compress(data.ljust(grain_sectors * 512, b"\0"))
        chunk = struct.pack("<QI", index * grain_sectors, len(packed)) + packed
        body += chunk.ljust(-(-len(chunk) // 512) * 512, b"\0")
    body += marker(4, 1)
    gt_sector = len(body) // 512
    body += struct.pack("<512I", *table)
    body += marker(1, 2)
    gd_sector = len(body) // 512
    body += struct.pack("<I", gt_sector).ljust(512, b"\0")
    body += marker(1, 3) + header(gd_sector) + bytes(512)
    path.write_bytes(bytes(body))


@needs_qemu_img
def test_lint_stream_with_footer(tmp_path: Path) -> None:
    capacity = 1 * MiB
    grains = {0: os.urandom(64 * 1024), 5: b"vmbuild" * 1000}
    vmdk = tmp_path / "vmw.vmdk"
    _write_stream_with_footer(vmdk, grains, capacity)
    raw = tmp_path / "expected.raw"
    with raw.open("wb") as f:
        f.truncate(capacity)
        for index, data in grains.items():
            f.seek(index * 64 * 1024)
            f.write(data)
    _qemu_img("compare", "-f", "vmdk", "-F", "raw", str(vmdk), str(raw))  # QEMU agrees
    info = inspect_vmdk(vmdk)
    assert info.problems == [] and info.create_type == "streamOptimized"
    assert info.adapter_type == "lsilogic" and info.capacity == capacity
    assert lint_vmdk(vmdk) == []

    data = vmdk.read_bytes()
    vmdk.write_bytes(data[:-1536])  # the copy stopped just before the footer
    problems = lint_vmdk(vmdk)
    assert any("must end with a footer and the end-of-stream marker" in p for p in problems)
    vmdk.write_bytes(data[:-512] + b"\1" * 512)  # no end-of-stream marker
    assert any("end-of-stream" in p for p in lint_vmdk(vmdk, qemu_img=None))


# --------------------------------------------------------------------------- guestOS lint


@needs_qemu_img
@pytest.mark.parametrize(("guest_os", "hw", "known"), [
    ("debian12-64", 19, False), ("debian12-64", 20, True), ("debian12-64", 21, True),
    ("debian11-64", 16, False), ("debian11-64", 17, True),
    ("debian10-64", 12, False), ("debian10-64", 13, True),
    ("other5xlinux-64", 17, False), ("other5xlinux-64", 18, True),
    ("other4xlinux-64", 11, False), ("other4xlinux-64", 13, True),
    ("otherlinux-64", 4, True),  # not in the table: not judged
])
def test_strict_lint_checks_guest_os_against_hardware_version(
        image: Callable[..., Path], guest_os: str, hw: int, known: bool) -> None:
    vmx = image(guest_os=guest_os, hardware_version=max(hw, 7))
    mapping = load_vmx(vmx)
    mapping["virtualhw.version"] = str(hw)
    vmx.write_text(dump_vmx(mapping))
    strict = [p for p in lint_vmx(vmx, strict_guest_os=True) if "guestOS" in p]
    if known:
        assert strict == []
    else:
        assert len(strict) == 1, strict
        assert f"guestOS '{guest_os}' is known to VMware products of virtualHW.version" in \
            strict[0]
        assert f"the VM has version {hw}" in strict[0]
    # Not strict: the same file passes (the recipe default, 19 with debian12-64, is one).
    assert [p for p in lint_vmx(vmx) if "guestOS" in p] == []


@needs_qemu_img
def test_strict_lint_suggests_what_the_hardware_knows(image: Callable[..., Path]) -> None:
    vmx = image()  # the recipe default: virtualHW.version 19, debian12-64
    assert 'virtualHW.version = "19"' in vmx.read_text()
    assert 'guestOS = "debian12-64"' in vmx.read_text()
    assert lint_vmx(vmx) == []
    (problem,) = lint_vmx(vmx, strict_guest_os=True)
    assert "use virtualHW.version 20, or guestOS debian11-64" in problem
    fixed = image(guest_os="debian11-64")
    assert lint_vmx(fixed, strict_guest_os=True) == []


@needs_qemu_img
@pytest.mark.parametrize("spelling", ["debian12_64Guest", "other5xLinux64Guest", "debian12_64"])
def test_lint_refuses_the_vsphere_api_spelling_of_guest_os(image: Callable[..., Path],
                                                           spelling: str) -> None:
    vmx = image()
    mapping = load_vmx(vmx)
    mapping["guestos"] = spelling
    vmx.write_text(dump_vmx(mapping))
    problems = lint_vmx(vmx)
    assert len(problems) == 1, problems
    assert f"guestOS {spelling!r} is spelt as the vSphere API spells guest ids" in problems[0]
