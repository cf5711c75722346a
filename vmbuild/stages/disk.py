"""Assemble a bootable, partitioned raw disk from a root directory, without loop devices.

Loop devices and device-mapper are unreliable on build hosts (no udev, no kpartx, containers),
and a build killed half-way must not leave kernel state behind. So everything here is plain file
I/O: `sfdisk` writes the partition table into the file, `mkfs.ext4 -d` writes the filesystem
straight from the directory at the partition's offset (which also leaves no deleted blocks behind
to bloat the VMDK), and GRUB's BIOS stage is written by hand the way `grub-bios-setup` would,
since that tool is not shipped in Debian's `grub-pc-bin` and wants a block device anyway.

None of it needs root. What root alone can put into a directory tree, device nodes, is
written into the filesystem afterwards with `debugfs` (see `complete_dev`), so a tree made
by `mmdebstrap --mode=unshare` gives the same filesystem as one made as root.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmbuild.errors import BuildError
from vmbuild.tools import run_tool

SECTOR = 512
MIB = 1024 * 1024
FIRST_PARTITION_OFFSET = MIB  # 2048 sectors: room for GRUB's core.img in the MBR gap
ESP_SIZE = 64 * MIB
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")

# Modules built into GRUB's core image: enough to find the root filesystem by UUID and load
# the rest (`normal`, `linux`, ...) from /boot/grub/<platform>/ inside it.
_CORE_MODULES = ["part_msdos", "part_gpt", "ext2", "search", "search_fs_uuid", "normal",
                 "configfile", "linux", "echo", "test", "serial", "terminal"]
_BIOS_MODULES = ["biosdisk", *_CORE_MODULES]
_EFI_MODULES = ["fat", "efi_gop", "efi_uga", "all_video", *_CORE_MODULES]

# Offsets in GRUB's boot.img (grub-core/boot/i386/pc/boot.S) and diskboot.img.
_BOOT_KERNEL_SECTOR = 0x5C
_BOOT_DRIVE = 0x64
_BOOT_DRIVE_CHECK = 0x66
_MBR_CODE_END = 0x1B8  # disk signature + partition table + 0x55AA follow; keep those
_BLOCKLIST = SECTOR - 12  # last blocklist entry of diskboot.img: start(u64) len(u16) seg(u16)

# What mmdebstrap puts into /dev when it may call mknod (its @devfiles table, 1.3.5): name,
# kind, permission bits, then major/minor or the link target. Without root (unshare mode) it
# can create none of the nodes and removes its placeholders, so `complete_dev` writes the
# missing entries into the filesystem, owned by root with these modes, as the root build has
# them. The guest mounts devtmpfs over /dev at boot; the entries matter for chroots of the
# disk and for two builds of one base being the same filesystem whoever built them.
DEV_ENTRIES: tuple[tuple[str, str, int, tuple[int, int] | str | None], ...] = (
    ("console", "char", 0o666, (5, 1)),
    ("fd", "link", 0o777, "/proc/self/fd"),
    ("full", "char", 0o666, (1, 7)),
    ("null", "char", 0o666, (1, 3)),
    ("ptmx", "char", 0o666, (5, 2)),
    ("pts", "dir", 0o755, None),
    ("random", "char", 0o666, (1, 8)),
    ("shm", "dir", 0o755, None),
    ("stderr", "link", 0o777, "/proc/self/fd/2"),
    ("stdin", "link", 0o777, "/proc/self/fd/0"),
    ("stdout", "link", 0o777, "/proc/self/fd/1"),
    ("tty", "char", 0o666, (5, 0)),
    ("urandom", "char", 0o666, (1, 9)),
    ("zero", "char", 0o666, (1, 5)),
)
_TYPE_BITS = {"char": 0o020000, "link": 0o120000, "dir": 0o040000}


@dataclass(frozen=True)
class DiskLayout:
    """Where things are on the assembled disk; the UUIDs go into grub.cfg and fstab."""

    size: int
    firmware: str
    root_offset: int
    root_size: int
    root_uuid: str
    esp_offset: int | None = None
    esp_size: int | None = None


def plan_layout(size: int, firmware: str, root_uuid: str | None = None) -> DiskLayout:
    """Decide the partition geometry before the root directory is finalised (fstab needs it)."""
    if size < 256 * MIB:
        raise BuildError(f"disk size {size} bytes is too small for a Debian guest")
    size -= size % MIB
    rid = root_uuid or str(uuid.uuid4())
    if firmware == "efi":
        esp_offset = FIRST_PARTITION_OFFSET
        root_offset = esp_offset + ESP_SIZE
        # GPT keeps a backup header in the last 33 sectors: stop the root partition 1 MiB short.
        root_size = size - root_offset - MIB
        return DiskLayout(size, firmware, root_offset, root_size, rid, esp_offset, ESP_SIZE)
    root_size = size - FIRST_PARTITION_OFFSET
    return DiskLayout(size, firmware, FIRST_PARTITION_OFFSET, root_size, rid)


def grub_cfg(layout: DiskLayout, cmdline: str) -> str:
    """The boot menu: one entry, no timeout, kernel via Debian's /vmlinuz symlinks.

    Using the symlinks rather than a versioned file name keeps the image bootable after a
    kernel upgrade inside the guest, without running grub-mkconfig (which cannot see the
    right root device at build time anyway). The root is mounted read-write by the initramfs
    (`rw`; no file system check either): the job service then needs not wait for systemd to
    remount it, which under TCG was seconds of every start.
    """
    # BIOS: the 16-bit boot protocol. With `linux`, GRUB on i386-pc stages the kernel at 1 MiB
    # and, at boot, moves it (its whole init_size, about 30 MiB) to the kernel's preferred
    # 16 MiB with a backward byte-wise `rep movsb`: 3.5 s under TCG, every start (seen in
    # QEMU's monitor: the boot sat on that one instruction). `linux16` loads the kernel where
    # it runs and the kernel moves itself: the firmware-to-kernel phase went from 5 s to 2.5 s.
    linux, initrd, insmod = (("linux", "initrd", "") if layout.firmware == "efi"
                             else ("linux16", "initrd16", "insmod linux16\n"))
    return (
        "set timeout=0\n"
        "set default=0\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        f"{insmod}"
        "menuentry 'Debian GNU/Linux' {\n"
        f"  search --no-floppy --fs-uuid --set=root {layout.root_uuid}\n"
        f"  {linux} /vmlinuz root=UUID={layout.root_uuid} rw {cmdline}\n"
        f"  {initrd} /initrd.img\n"
        "}\n"
    )


def _early_cfg(layout: DiskLayout) -> str:
    return (
        f"search --no-floppy --fs-uuid --set=root {layout.root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )


def install_grub_files(root: Path, layout: DiskLayout, cmdline: str) -> None:
    """Put grub.cfg and the platform modules into the root tree before the filesystem is made."""
    grub_dir = root / "boot" / "grub"
    grub_dir.mkdir(parents=True, exist_ok=True)
    (grub_dir / "grub.cfg").write_text(grub_cfg(layout, cmdline))
    src = GRUB_EFI_DIR if layout.firmware == "efi" else GRUB_PC_DIR
    if not src.is_dir():
        pkg = "grub-efi-amd64-bin" if layout.firmware == "efi" else "grub-pc-bin"
        raise BuildError(f"{src} is missing: install the {pkg} package on the build host")
    dest = grub_dir / src.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for item in src.iterdir():
        if item.suffix in (".mod", ".lst", ".img", ".o") and item.is_file():
            shutil.copy2(item, dest / item.name)


def _partition(disk: Path, layout: DiskLayout) -> None:
    start = layout.root_offset // SECTOR
    sectors = layout.root_size // SECTOR
    if layout.firmware == "efi":
        assert layout.esp_offset is not None and layout.esp_size is not None
        script = (
            "label: gpt\n"
            f"start={layout.esp_offset // SECTOR}, size={layout.esp_size // SECTOR}, "
            "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n"
            f"start={start}, size={sectors}, "
            "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root\n"
        )
    else:
        script = f"label: dos\nstart={start}, size={sectors}, type=83, bootable\n"
    run_tool(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)], "sfdisk", script)


def _make_root_fs(disk: Path, root: Path, layout: DiskLayout) -> None:
    blocks = layout.root_size // 4096
    run_tool(
        ["mkfs.ext4", "-q", "-F", "-L", "vmroot", "-U", layout.root_uuid, "-b", "4096",
         "-d", str(root), "-E", f"offset={layout.root_offset},nodiscard",
         str(disk), str(blocks)],
        "mkfs.ext4",
    )


def _debugfs_fs(disk: Path, layout: DiskLayout) -> str:
    """The root filesystem as debugfs names it: the disk file at the partition's offset."""
    return f"{disk}?offset={layout.root_offset}"


def list_dir(disk: Path, layout: DiskLayout, path: str) -> dict[str, tuple[int, int, int]]:
    """Name -> (mode, uid, gid) of the entries of directory `path` in the root filesystem.

    Read with `debugfs ls -p`; debugfs exits 0 even when it cannot read, so an unreadable
    directory shows up as an empty result, which callers treat as entries missing.
    """
    out = run_tool(["debugfs", "-R", f"ls -p {path}", _debugfs_fs(disk, layout)],
                   f"listing {path} in the root filesystem")
    entries: dict[str, tuple[int, int, int]] = {}
    for line in out.splitlines():
        fields = line.split("/")  # /inode/mode/uid/gid/name/size/
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            entries[fields[5]] = (int(fields[2], 8), int(fields[3]), int(fields[4]))
    return entries


def complete_dev(disk: Path, layout: DiskLayout, root: Path) -> list[str]:
    """Write the DEV_ENTRIES the tree's /dev lacks into the filesystem; return their names.

    A tree without /dev (not a Debian root) is left alone. Each entry is made root:root with
    mmdebstrap's mode, then read back: debugfs reports failures only in its output.
    """
    dev = root / "dev"
    if not dev.is_dir():
        return []
    missing = [e for e in DEV_ENTRIES if not os.path.lexists(dev / e[0])]
    if not missing:
        return []
    commands = ["cd /dev"]
    for name, kind, mode, spec in missing:
        if kind == "char":
            assert isinstance(spec, tuple)
            commands.append(f"mknod {name} c {spec[0]} {spec[1]}")
        elif kind == "link":
            commands.append(f"symlink {name} {spec}")
        else:
            commands.append(f"mkdir {name}")
        commands += [f"sif {name} mode 0{_TYPE_BITS[kind] | mode:o}",
                     f"sif {name} uid 0", f"sif {name} gid 0"]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        run_tool(["debugfs", "-w", "-f", script.name, _debugfs_fs(disk, layout)],
                 "writing /dev entries")
    found = list_dir(disk, layout, "/dev")
    wrong = [name for name, kind, mode, _ in missing
             if found.get(name) != (_TYPE_BITS[kind] | mode, 0, 0)]
    if wrong:
        raise BuildError("debugfs did not write /dev entries: " + ", ".join(wrong))
    return [e[0] for e in missing]


def _install_grub_bios(disk: Path, layout: DiskLayout, work: Path) -> None:
    early = work / "early.cfg"
    early.write_text(_early_cfg(layout))
    core = work / "core.img"
    run_tool(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-c", str(early),
          "-p", "/boot/grub", *_BIOS_MODULES], "grub-mkimage (i386-pc)")
    core_img = bytearray(core.read_bytes())
    if len(core_img) % SECTOR:
        core_img += bytes(SECTOR - len(core_img) % SECTOR)
    core_sectors = len(core_img) // SECTOR
    if 1 + core_sectors > FIRST_PARTITION_OFFSET // SECTOR:
        raise BuildError("GRUB core image does not fit before the first partition")
    # diskboot.img (the first sector of core.img) loads the rest of core.img from this list.
    struct.pack_into("<QHH", core_img, _BLOCKLIST, 2, core_sectors - 1, 0x820)
    boot = bytearray((GRUB_PC_DIR / "boot.img").read_bytes())
    struct.pack_into("<Q", boot, _BOOT_KERNEL_SECTOR, 1)
    boot[_BOOT_DRIVE] = 0xFF  # use the drive the BIOS booted from
    boot[_BOOT_DRIVE_CHECK:_BOOT_DRIVE_CHECK + 2] = b"\x90\x90"  # hard disk: skip floppy probe
    with disk.open("r+b") as f:
        f.seek(0)
        f.write(boot[:_MBR_CODE_END])
        f.seek(SECTOR)
        f.write(core_img)


def _install_grub_efi(disk: Path, layout: DiskLayout, work: Path) -> None:
    assert layout.esp_offset is not None and layout.esp_size is not None
    early = work / "early.cfg"
    early.write_text(_early_cfg(layout))
    efi = work / "BOOTX64.EFI"
    run_tool(["grub-mkimage", "-O", "x86_64-efi", "-o", str(efi), "-c", str(early),
          "-p", "/boot/grub", *_EFI_MODULES], "grub-mkimage (x86_64-efi)")
    esp = work / "esp.img"
    run_tool(["mkfs.fat", "-C", "-F", "32", "-n", "ESP", str(esp), str(layout.esp_size // 1024)],
         "mkfs.fat")
    for d in ("::/EFI", "::/EFI/BOOT"):
        run_tool(["mmd", "-i", str(esp), d], "mmd")
    # The removable-media path needs no NVRAM boot entry, so VMware and OVMF both find it.
    run_tool(["mcopy", "-i", str(esp), str(efi), "::/EFI/BOOT/BOOTX64.EFI"], "mcopy")
    with esp.open("rb") as src, disk.open("r+b") as dst:
        dst.seek(layout.esp_offset)
        shutil.copyfileobj(src, dst, 4 * MIB)


def assemble_disk(root: Path, disk: Path, layout: DiskLayout) -> None:
    """Write a bootable raw disk image at `disk` from the prepared root tree."""
    with disk.open("wb") as f:
        f.truncate(layout.size)
    _partition(disk, layout)
    _make_root_fs(disk, root, layout)
    complete_dev(disk, layout, root)
    with tempfile.TemporaryDirectory(prefix="vmbuild-grub-") as tmp:
        if layout.firmware == "efi":
            _install_grub_efi(disk, layout, Path(tmp))
        else:
            _install_grub_bios(disk, layout, Path(tmp))
