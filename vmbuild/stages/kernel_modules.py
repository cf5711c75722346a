"""Which kernel modules a job image keeps (issue 9: a guest that carries what the job needs).

Debian's kernel ships every driver it has (90 MiB of modules for the cloud kernel, more for
the generic one): file systems, RDMA, netfilter, Xen and Hyper-V, most of it never loaded in
a VM whose virtual hardware the .vmx fixes. Every job start transfers the image, so the seal
deletes the modules no entry below asks for, after provisioning (a package the application
installed may have built its own module: name it in `guest.modules`). What an entry names is
kept with everything it depends on (the seal asks `modprobe --show-depends`); a name the
kernel does not have (the cloud kernel has no LSI or AHCI drivers) is skipped. The manifest
lists the groups and why each is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vmbuild.recipe import Recipe

# Where the seal finds the list in the guest (one module name a line).
KEPT_FILE = "/etc/vmbuild/modules-kept"
# The drivers the shipped image's initramfs carries (vmbuild/guest/vmbuild-initramfs, run by
# the seal after the pruning): the disk controllers'. Its /init loads only the one whose PCI
# device is there, by alias, and mounts the root; no udev, kmod or libraries. initramfs-tools'
# image, which boots the build VM, was 15 MB unpacked and 4-5 s of every TCG start
# (starting udev, loading kmod's libraries); this one is 1.3 MB and about a second.
INITRAMFS_FILE = "/etc/vmbuild/initramfs-modules"


@dataclass(frozen=True)
class Kept:
    modules: tuple[str, ...]
    why: str


DISKS = Kept(
    ("vmw_pvscsi", "mptspi", "mptsas", "BusLogic", "sym53c8xx", "ahci", "nvme", "sd_mod",
     "virtio_pci", "virtio_scsi", "virtio_blk"),
    "the virtual disk controllers a .vmx can declare, QEMU's stand-ins for them, and the "
    "build VM's (the job's input and output disks sit on the boot disk's controller). Not "
    "the PC's legacy IDE (ata_piix): no disk is on it, and udev loading it cost a second of "
    "every TCG start")
FILESYSTEMS = Kept(
    ("ext4", "fuse", "overlay", "loop", "squashfs", "isofs", "vfat", "nls_utf8", "nls_cp437",
     "nls_ascii", "autofs4", "efivarfs"),
    "the root's ext4 (built into the cloud kernel, a module of the generic one), file systems "
    "a job may mount itself (FUSE, overlays, loop-mounted images, ISO, FAT), systemd's "
    "automounts and the EFI variables of `firmware: efi`")
POWER_BUTTON = Kept(
    ("button", "evdev"),
    "the ACPI power button and the input events the job's wrapper reads it from: a power-off "
    "from outside (a validation boot's `until: started`, a soft stop) shuts the job down "
    "cleanly")
VMWARE = Kept(
    ("vmw_vmci", "vmw_balloon", "vmw_vsock_vmci_transport", "vsock", "vmxnet3", "pvpanic"),
    "VMware's guest devices (VMCI, memory balloon, vSockets for open-vm-tools) and panic "
    "notifier")
NETWORK = Kept(
    ("vmxnet3", "e1000", "e1000e", "virtio_net", "af_packet", "tun"),
    "the network cards a .vmx can declare and the build VM's (job.network or guest.ssh)")


def kept(recipe: Recipe) -> tuple[Kept, ...]:
    groups = [DISKS, POWER_BUTTON, FILESYSTEMS, VMWARE]
    if recipe.job.network or recipe.guest.ssh:
        groups.append(NETWORK)
    if recipe.guest.modules:
        groups.append(Kept(recipe.guest.modules, "asked for by the recipe (guest.modules)"))
    return tuple(groups)


INITRAMFS_MODULES = (*DISKS.modules, "ext4")


def _one_a_line(names: Iterable[str]) -> bytes:
    """A module list file for the seal: each name once, in order, one a line."""
    return "".join(name + "\n" for name in dict.fromkeys(names)).encode()


def initramfs_file() -> bytes:
    return _one_a_line(INITRAMFS_MODULES)


def initramfs_manifest_entry() -> dict[str, object]:
    return {"made_by": "vmbuild-initramfs (busybox; the seal)", "drivers": list(INITRAMFS_MODULES),
            "why": "loads only the present disk controller's driver, then mounts the root "
                   "read-write: no udev, kmod or libraries"}


def kept_file(recipe: Recipe) -> bytes:
    return _one_a_line(name for group in kept(recipe) for name in group.modules)


def manifest_entry(recipe: Recipe) -> list[dict[str, object]]:
    return [{"modules": list(group.modules), "why": group.why} for group in kept(recipe)]
