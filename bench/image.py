#!/usr/bin/env python3
"""Benchmark what a job start ships and what the image carries (issue 9's size figures).

For the image and a baseline image (for example the same recipe built before the diet),
measured in the same invocation:

- the bytes a job start transfers: the files `transfer_input_files` of the HTCondor submit
  file `vmbuild submit` writes for the image names (the runner bundle included);
- the files in the image: the root file system's used space and its largest parts (kernel
  modules, python3, perl, the kernel and the initramfs), read from the disk with debugfs,
  without mounting it.

Sizes do not vary between runs, so each is measured once; the ratio is image / baseline.

    .venv/bin/python bench/image.py --image out/hello/hello.vmx --baseline old/hello.vmx
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
# The parts of the image issue 9 names, as globs of top directories/files in the root fs.
PARTS = {
    "kernel modules": ["/usr/lib/modules"],
    "python3": ["/usr/lib/python3.11", "/usr/bin/python3.11"],
    "perl": ["/usr/lib/x86_64-linux-gnu/perl", "/usr/lib/x86_64-linux-gnu/perl-base",
             "/usr/share/perl", "/usr/share/perl5", "/usr/bin/perl"],
    "initrd": ["/boot/initrd.img-*"],
    "vmlinuz": ["/boot/vmlinuz-*"],
}


def vmbuild() -> str:
    return str(REPO / ".venv" / "bin" / "vmbuild")


def transfer_bytes(vmx: Path) -> tuple[int, dict[str, int]]:
    """The files the generated submit file transfers into each job's sandbox, and their sizes."""
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        proc = subprocess.run([vmbuild(), "submit", str(vmx), "-s", "condor", "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench: vmbuild submit {vmx} failed:\n{proc.stderr}")
        submit = next(Path(tmp).glob("*.sub"))
        settings = dict(line.split("=", 1) for line in submit.read_text().splitlines()
                        if "=" in line and not line.lstrip().startswith("#"))
        settings = {k.strip(): v.strip() for k, v in settings.items()}
        names = [n.strip() for n in settings["transfer_input_files"].split(",")]
        if settings.get("transfer_executable", "true").lower() == "true":
            names.append(settings["executable"])
        files: dict[str, int] = {}
        for name in names:
            path = (submit.parent / name) if not Path(name).is_absolute() else Path(name)
            files[path.name] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) \
                if path.is_dir() else path.stat().st_size
        return sum(files.values()), files


def root_partition(vmx: Path, work: Path) -> Path:
    """The image's root file system as a plain file (debugfs reads no partition tables)."""
    disk = next(vmx.parent / m.group(1) for m in re.finditer(
        r'^\S+:0\.fileName\s*=\s*"([^"]+\.vmdk)"', vmx.read_text(), re.M))
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    part = max(table["partitions"], key=lambda p: p["size"])  # root, not the ESP
    sector = table.get("sectorsize", 512)
    root = work / "root.ext4"
    subprocess.run(["dd", f"if={raw}", f"of={root}", f"bs={sector}", f"skip={part['start']}",
                    f"count={part['size']}", "conv=sparse", "status=none"], check=True)
    raw.unlink()
    return root


def debugfs(fs: Path, commands: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as f:
        f.write("\n".join(commands) + "\n")
        f.flush()
        return subprocess.run(["debugfs", "-f", f.name, str(fs)], check=True,
                              capture_output=True, text=True).stdout


def sizes_under(fs: Path, tops: list[str]) -> int:
    """Apparent size of every regular file under the given paths (globs in the last part),
    walked a directory level at a time with one debugfs run per level."""
    total, level, seen = 0, [], set[str]()
    for top in tops:
        parent, _, pattern = top.rpartition("/")
        for name, mode, size in listing(fs, [parent or "/"], seen).get(parent or "/", []):
            if name not in (".", "..") and Path(name).match(pattern):
                if mode.startswith("04"):
                    level.append(f"{parent}/{name}")
                elif mode.startswith("10"):
                    total += size
    while level:
        found = listing(fs, level, seen)
        level = []
        for directory, entries in found.items():
            for name, mode, size in entries:
                if name in (".", ".."):
                    continue
                if mode.startswith("04"):
                    level.append(f"{directory}/{name}")
                elif mode.startswith("10"):
                    total += size
    return total


def listing(fs: Path, directories: list[str], seen: set[str] | None = None
            ) -> dict[str, list[tuple[str, str, int]]]:
    seen = set() if seen is None else seen
    out = debugfs(fs, [f'ls -p "{d}"' for d in directories])
    result: dict[str, list[tuple[str, str, int]]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p"):
            current = line.split('"')[1]
            result[current] = []
        elif current is not None and line.startswith("/"):
            fields = line.split("/")  # /inode/mode/uid/gid/name/size/
            if len(fields) >= 7:  # directories have no size field
                size = int(fields[6]) if fields[6].isdigit() else 0
                if fields[2].startswith("10"):  # a hard-linked file counts once
                    if fields[1] in seen:
                        size = 0
                    seen.add(fields[1])
                result[current].append((fields[5], fields[2].zfill(6), size))
    return result


def measure(vmx: Path) -> dict[str, float]:
    total, files = transfer_bytes(vmx)
    figures = {"transfer_mib": total / MIB}
    figures.update({f"transfer {name}_mib": size / MIB for name, size in files.items()})
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir="/var/tmp") as tmp:
        fs = root_partition(vmx, Path(tmp))
        figures["files in the image_mib"] = sizes_under(fs, ["/*"]) / MIB
        for part, tops in PARTS.items():
            figures[f"{part}_mib"] = sizes_under(fs, tops) / MIB
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, type=Path, help="the image's .vmx")
    parser.add_argument("--baseline", type=Path, help="a second image measured alongside")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = {"image": measure(args.image)}
    if args.baseline:
        figures["baseline"] = measure(args.baseline)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print("sizes (MiB; measured once, they do not vary)"
          + ("; ratio to the baseline" if args.baseline else "") + ":")
    keys = list(dict.fromkeys([*figures["image"], *figures.get("baseline", {})]))
    for key in keys:
        value = figures["image"].get(key)
        base = figures.get("baseline", {}).get(key)
        shown = f"{value:8.1f}" if value is not None else "       -"
        ratio = f"  baseline {base:8.1f}" if base is not None else ""
        if value is not None and base:
            ratio += f"  ({value / base:.2f}x)"
        print(f"  {key.removesuffix('_mib'):<34}{shown}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
