"""Tiny stand-in images for scheduler tests: a real .vmx and a valid (flat, sparse-file)
VMDK, so the submit writers read memory, CPUs and files exactly as from a built image."""

from __future__ import annotations

from pathlib import Path

DISK_MIB = 8


def make_image(directory: Path, name: str = "hello", memory_mib: int = 512,
               cpus: int = 1) -> Path:
    """Write DIRECTORY/NAME.vmx + NAME.vmdk (descriptor) + NAME-flat.vmdk; return the .vmx."""
    directory.mkdir(parents=True, exist_ok=True)
    sectors = DISK_MIB * 2048
    flat = directory / f"{name}-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(sectors * 512)
    (directory / f"{name}.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n'
        f'RW {sectors} FLAT "{flat.name}" 0\n\n'
        'ddb.virtualHWVersion = "19"\nddb.adapterType = "lsilogic"\n')
    vmx = directory / f"{name}.vmx"
    vmx.write_text(
        '.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "19"\n'
        f'displayName = "{name}"\nguestOS = "debian12-64"\nmemsize = "{memory_mib}"\n'
        f'numvcpus = "{cpus}"\nscsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n'
        f'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "{name}.vmdk"\n')
    return vmx
