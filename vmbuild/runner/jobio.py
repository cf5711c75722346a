"""The job's input and output disks, made and read on the host without root.

Inputs: the files and directories given with ``--input`` (plus ``vmbuild-input.json`` with
extra arguments and environment) are written into an ext4 filesystem labelled ``VMBINPUT``
with ``mkfs.ext4 -d`` (no mount, no root). Outputs: an empty ext4 filesystem labelled
``VMBOUTPUT``; after the VM powers off, ``debugfs -R 'rdump / DIR'`` copies its files out.
Both are converted to qcow2 so the runner can layer and checkpoint them like the system disk.

Standard library only: the runner ships alone to execute nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .contract import INPUT_LABEL, OUTPUT_LABEL
from .core import RunnerError

INPUT_SPEC = "vmbuild-input.json"
_MIB = 1024 * 1024


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise RunnerError(f"{name} is needed on this host (package e2fsprogs/qemu-utils)")
    return found


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RunnerError(f"{' '.join(argv[:2])} failed: {proc.stdout.strip()[-800:]}")


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, dirs, files in os.walk(path):
        total += 4096 * (len(dirs) + 1)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size + 4096
    return total


def make_ext4(target: Path, label: str, source: Path | None, size_bytes: int) -> None:
    """An ext4 image of ``size_bytes`` (sparse) at ``target``, filled from ``source``."""
    size_bytes = max(size_bytes, 8 * _MIB)
    size_bytes = (size_bytes + _MIB - 1) // _MIB * _MIB
    with open(target, "wb") as f:
        f.truncate(size_bytes)
    argv = [_tool("mkfs.ext4"), "-q", "-F", "-L", label, "-m", "0",
            "-E", "root_owner=0:0", "-O", "^has_journal"]
    if source is not None:
        argv += ["-d", str(source)]
    _run([*argv, str(target)])


def to_qcow2(raw: Path, target: Path) -> None:
    _run([_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(target)])


def make_input_disk(target: Path, inputs: Sequence[Path], args: Sequence[str],
                    env: dict[str, str], *, command: Sequence[str] | None = None,
                    shell: bool = False) -> None:
    """A qcow2 at ``target`` holding an ext4 labelled VMBINPUT with the inputs at its top
    (each under its own base name) and ``vmbuild-input.json`` when args/env are given.

    ``command`` replaces the image's job command and ``shell`` asks for a root shell on the
    console instead of the job: both exist for one boot only (a validation boot, ``vmbuild
    shell``), which is why they travel here and are never baked into the image."""
    with tempfile.TemporaryDirectory(prefix=".stage-input-", dir=target.parent) as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        for item in inputs:
            if not item.exists():
                raise RunnerError(f"--input {item}: no such file or directory", 2)
            dest = stage / item.resolve().name
            if dest.exists() or dest.name == INPUT_SPEC:
                raise RunnerError(f"--input {item}: two inputs named {dest.name!r}", 2)
            if item.is_dir():
                shutil.copytree(item, dest, symlinks=True)
            else:
                shutil.copy2(item, dest)
        if args or env or command or shell:
            spec: dict[str, object] = {"args": list(args), "environment": dict(env)}
            if command:
                spec["command"] = list(command)
            if shell:
                spec["shell"] = True
            (stage / INPUT_SPEC).write_text(json.dumps(spec, indent=1) + "\n")
        size = _tree_size(stage) * 5 // 4 + 16 * _MIB
        raw = Path(tmp) / "input.raw"
        make_ext4(raw, INPUT_LABEL, stage, size)
        to_qcow2(raw, target)


def make_output_disk(target: Path, size_mib: int) -> None:
    """A qcow2 at ``target`` holding an empty ext4 labelled VMBOUTPUT of ``size_mib``."""
    with tempfile.TemporaryDirectory(prefix=".stage-output-", dir=target.parent) as tmp:
        raw = Path(tmp) / "output.raw"
        make_ext4(raw, OUTPUT_LABEL, None, size_mib * _MIB)
        to_qcow2(raw, target)


def extract_outputs(top_layer: Path, dest: Path) -> list[str]:
    """Copy the files of the output disk (its qcow2 chain ending in ``top_layer``, whose
    headers name their backing files relatively) into ``dest``; return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stage-extract-", dir=top_layer.parent) as tmp:
        raw = Path(tmp) / "output.raw"
        _run([_tool("qemu-img"), "convert", "-q", "-O", "raw", str(top_layer), str(raw)])
        dump = Path(tmp) / "dump"
        dump.mkdir()
        proc = subprocess.run([_tool("debugfs"), "-R", f"rdump / {dump}", str(raw)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RunnerError(f"debugfs could not read the output disk: {proc.stderr.strip()}")
        # rdump of "/" writes the root's entries directly into the target directory.
        shutil.rmtree(dump / "lost+found", ignore_errors=True)
        copied: list[str] = []
        for dirpath, _dirs, files in os.walk(dump):
            rel_dir = os.path.relpath(dirpath, dump)
            os.makedirs(dest / rel_dir, exist_ok=True)
            for name in files:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                shutil.copy2(os.path.join(dirpath, name), dest / rel, follow_symlinks=False)
                copied.append(rel)
        return sorted(copied)
