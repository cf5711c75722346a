"""The whole pipeline: recipe -> base -> Packer + Ansible -> VMDK + VMX + manifest -> validate.

Each step works inside a temporary directory beside the output directory; the output directory
is published by rename only after every step (validation included) has passed, so a failed or
cancelled build leaves the previous image, if any, untouched and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild import __version__
from vmbuild.errors import BuildError, UsageError
from vmbuild.events import Event, Reporter, Stage
from vmbuild.recipe import Recipe, recipe_to_dict
from vmbuild.runner.accel import best_accelerator
from vmbuild.runner.qemu_devices import find_ovmf
from vmbuild.stages import bootpath, kernel_modules
from vmbuild.stages.artifact import render_vmx, write_transport
from vmbuild.stages.base import BaseImage, ensure_base
from vmbuild.stages.packer import PackerJob, PackerRun, packer_version, write_template
from vmbuild.stages.playbook import write_playbook
from vmbuild.stages.validate import BootSpec, qemu_cannot_boot, result_data, validate_image
from vmbuild.tools import run_tool

MANIFEST = "manifest.json"
MIB = 1024 * 1024
BUILD_BOOT_ATTEMPTS = 2  # a build VM whose boot hangs before SSH is booted once more
SSH_TIMEOUT = "Timeout waiting for SSH"  # Packer's words when the guest never answered
BUILD_MEMORY_MIB = 1024  # the build boot gets at least this much: apt and Ansible need it


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    validate: bool = True
    boot_timeout: float | None = None  # overrides the recipe's validate.timeout
    refresh_base: bool = False
    cache: Path | None = None
    keep_work: bool = False


@dataclass
class BuildResult:
    output_dir: Path
    vmx: Path
    vmdk: Path
    manifest: dict[str, Any]
    base_cached: bool
    seconds: float
    validated: bool
    job_output: str = ""
    validation: dict[str, Any] = field(default_factory=dict)  # which mode proved it, how
    timings: dict[str, float] = field(default_factory=dict)


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the effective recipe and every file it brings into the image."""
    h = hashlib.sha256(json.dumps(recipe_to_dict(recipe), sort_keys=True).encode())
    paths = [f.src_path for f in recipe.application.files]
    if recipe.application.playbook is not None:
        paths.append(recipe.application.playbook)
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for item in files:
            h.update(str(item.relative_to(recipe.directory)).encode())
            h.update(hashlib.sha256(item.read_bytes()).digest())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def _keygen(path: Path, comment: str) -> None:
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
         "ssh-keygen")


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"{out}: exists, is not empty and holds no vmbuild image; "
                         "choose another --output directory")


def publish(staged: Path, out: Path) -> None:
    """Swap the finished image in by rename; an older image is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staged, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_image(recipe: Recipe, options: BuildOptions, report: Reporter) -> BuildResult:
    started = time.monotonic()
    out = options.output_dir.resolve()
    _check_output_dir(out)
    for tool in ("packer", "qemu-img", "qemu-system-x86_64", "ssh-keygen", "zstd"):
        if shutil.which(tool) is None:
            raise UsageError(f"{tool} is not installed: see the README's set-up")
    why = qemu_cannot_boot(recipe.guest.firmware, recipe.output.disk_controller)
    if options.validate and why:
        raise UsageError(f"{recipe.path}: {why}")
    timings: dict[str, float] = {}

    t = time.monotonic()
    base = ensure_base(recipe, report, cache=options.cache, refresh=options.refresh_base)
    timings["base"] = time.monotonic() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".vmbuild-{recipe.name}-", dir=out.parent))
    try:
        staged = work / "image"
        staged.mkdir()
        t = time.monotonic()
        version, disk = _app_stage(recipe, base, work, report)
        timings["app"] = time.monotonic() - t
        t = time.monotonic()
        manifest = _artifact(recipe, base, version, disk, work, staged, report)
        timings["artifact"] = time.monotonic() - t
        vmx = staged / f"{recipe.name}.vmx"
        job_output = ""
        validation: dict[str, Any] = {}
        if options.validate:
            t = time.monotonic()
            spec = BootSpec.from_recipe(recipe.validate)
            if options.boot_timeout is not None:
                spec = dataclasses.replace(spec, timeout=options.boot_timeout)
            result = validate_image(vmx, report, spec=spec)
            timings["validate"] = time.monotonic() - t
            if result is not None:
                job_output = result.job_output
                validation = result_data(result, spec)
        manifest["validated"] = options.validate
        manifest["validation"] = validation
        manifest["timings"] = {k: round(v, 1) for k, v in timings.items()}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        publish(staged, out)
        report(Event("publish", "done", f"image published in {out}", {"path": str(out)}))
    finally:
        if options.keep_work:
            report(Event("build", "step", f"work directory kept: {work}"))
        else:
            shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, out / f"{recipe.name}.vmx", out / f"{recipe.name}.vmdk", manifest,
                       base.cached, time.monotonic() - started, options.validate, job_output,
                       validation, timings)


def _app_stage(recipe: Recipe, base: BaseImage, work: Path,
               report: Reporter) -> tuple[str, Path]:
    version = packer_version()
    with Stage(report, "packer", f"application stage (Packer {version}, Ansible)") as stage:
        keys = work / "keys"
        keys.mkdir(mode=0o700)
        _keygen(keys / "build_key", "vmbuild-build")
        _keygen(keys / "host_key", "vmbuild-guest")
        host_pub = (keys / "host_key.pub").read_text().split()
        (keys / "known_hosts").write_text(f"vmbuild-guest {host_pub[0]} {host_pub[1]}\n")

        disk = work / "app-input.qcow2"
        ansible = work / "ansible"
        playbook = write_playbook(recipe, ansible / "project")
        spec = {
            "work_dir": str(ansible),
            "playbook": str(playbook),
            "ssh_key": str(keys / "build_key"),
            "known_hosts": str(keys / "known_hosts"),
            "packages_out": str(work / "packages.json"),
        }
        spec_path = work / "provision.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        accel = best_accelerator()
        stage.step(f"accelerator: {accel}")
        job = PackerJob(
            name=recipe.name,
            disk=disk,
            output_dir=work / "packer-output",
            disk_size_mib=recipe.guest.disk // MIB,
            memory_mib=max(recipe.guest.memory // MIB, BUILD_MEMORY_MIB),
            cpus=max(recipe.guest.cpus, os.cpu_count() or 1),
            firmware=recipe.guest.firmware,
            accelerator=accel,
            ssh_key=keys / "build_key",
            host_key=keys / "host_key",
            provision_spec=spec_path,
            console_log=work / "build-console.log",
            ovmf=find_ovmf(),
        )
        template = write_template(job, version, work)
        for attempt in range(1, BUILD_BOOT_ATTEMPTS + 1):
            run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                      str(base.disk), str(disk)], "creating the build layer")
            run = PackerRun(template, report)
            run.validate()
            try:
                run.build()
                break
            except BuildError as exc:
                tail = _tail(work / "build-console.log")
                hung = any(SSH_TIMEOUT in error for error in run.errors)
                if hung and not run.cancelled and attempt < BUILD_BOOT_ATTEMPTS:
                    # A TCG guest very rarely stalls early in its boot (seen once in many
                    # builds on 2-core machines): a fresh boot of the same disk goes through.
                    last = tail.splitlines()[-1].strip() if tail else "-"
                    report(Event("packer", "warning", "the build VM's boot hung before SSH "
                                 f"(console ends: {last}); booting it again"))
                    shutil.rmtree(job.output_dir, ignore_errors=True)
                    continue
                raise BuildError(f"{exc}\n  build console (last lines):\n    {tail}") from None
        produced = job.output_dir / f"{recipe.name}.qcow2"
        if not produced.is_file():
            raise BuildError(f"Packer finished but {produced} is missing")
        return str(version), produced


def _tail(path: Path, lines: int = 12) -> str:
    if not path.exists():
        return "(none)"
    return "\n    ".join(path.read_text(errors="replace").splitlines()[-lines:])


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _artifact(recipe: Recipe, base: BaseImage, packer: str, disk: Path, work: Path,
              staged: Path, report: Reporter) -> dict[str, Any]:
    with Stage(report, "artifact", f"writing the VMware image ({recipe.output.vmdk})") as stage:
        vmdk = staged / f"{recipe.name}.vmdk"
        subformat = recipe.output.vmdk
        adapter = {"pvscsi": "lsilogic", "lsilogic": "lsilogic", "sata": "ide",
                   "nvme": "lsilogic"}[recipe.output.disk_controller]
        run_tool(["qemu-img", "convert", "-O", "vmdk", "-o",
              f"subformat={subformat},adapter_type={adapter},hwversion=6"
              if subformat == "monolithicSparse" else f"subformat={subformat}",
              str(disk), str(vmdk)], "converting to VMDK")
        vmx = staged / f"{recipe.name}.vmx"
        vmx.write_text(render_vmx(recipe, vmdk.name))
        # What schedulers ship (a streamOptimized VMDK is compressed already).
        transport = write_transport(vmdk) if subformat == "monolithicSparse" else None
        if transport is not None:
            stage.step(f"transport form {transport['file']}: {transport['size'] / MIB:.1f} "
                       f"MiB (zstd {transport['zstd']}, {transport['seconds']} s)")
        info = json.loads(run_tool(["qemu-img", "info", "--output=json", "-U", str(disk)],
                               "qemu-img info"))
        packages_file = work / "packages.json"
        packages = json.loads(packages_file.read_text()) if packages_file.exists() else {}
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(staged.iterdir()) if p.is_file()}
        return {
            "vmbuild": __version__,
            "name": recipe.name,
            "recipe": str(recipe.path),
            "recipe_sha256": recipe_hash(recipe),
            "base_key": base.key,
            "base_cached": base.cached,
            "packer_version": packer,
            "accelerator": best_accelerator(),
            "guest": {"release": recipe.guest.release, "firmware": recipe.guest.firmware,
                      "memory_mib": recipe.guest.memory // MIB, "cpus": recipe.guest.cpus,
                      "init": recipe.guest.init,
                      "left_out": bootpath.manifest_entry(recipe),
                      "modules_kept": kernel_modules.manifest_entry(recipe),
                      "initramfs": kernel_modules.initramfs_manifest_entry()},
            "sizes": {"virtual": int(info.get("virtual-size", 0)),
                      "allocated": _allocated(base.disk) + _allocated(disk),
                      "vmdk": vmdk.stat().st_size,
                      **({"vmdk_zst": transport["size"]} if transport else {})},
            "transport": transport,
            "packages": packages,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
