"""The VMware backend: runs the image under VMware Workstation, Player or Fusion via ``vmrun``.

The image is copied into ``WORKDIR/vm/`` on a fresh start (VMware writes to its disks in
place, so the built image itself is never run), with the job's input and output disks added
as extra disks on the boot disk's controller, under the device keys VMware reads
(``scsi0:1``, ``sata0:1``, ``nvme0:1``), as VMDKs made with ``qemu-img`` from the ext4
images of :mod:`jobio` whose ``ddb.adapterType`` fits that controller.
``vmrun -T TYPE start VM.vmx nogui`` starts it; VMware's file-backed serial ports write
``job.log`` and ``control.log`` beside the ``.vmx``, which the runner follows (reading the
files, no subprocess per look); the VM is gone when VMware removes its ``.vmx.lck``
directory. A checkpoint is ``vmrun suspend VM.vmx hard|soft``: VMware writes the ``.vmss``
and the next ``vmrun start`` resumes it. The runner then publishes ``checkpoint.json``
(the serial-file offsets already shown, the control events seen) atomically.

A runner killed while VMware suspends (the scheduler's hard kill came before a slow suspend
finished) does not lose the VM: VMware completes the suspend on its own, and the next start
sees the ``.vmss`` and resumes. A VM left *running* by a killed runner is detected at the
next start (``vmrun list`` names it, or its lock directory is there) and suspended (stopped
with its state kept; ``stop hard`` if that fails) before the run continues, so two copies
never run and no work is thrown away.

Standard library only (plus ``qemu-img`` and e2fsprogs on the host for input/output disks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import jobio
from .core import (
    Backend,
    JobStreams,
    RunnerError,
    RunOptions,
    Workdir,
    log,
    read_json,
    write_atomic,
)
from .vmx import (
    UNIT_RANGES,
    VMDK_ADAPTER_TYPES,
    VmxDisk,
    VmxError,
    controller_prefix,
    free_units,
    load_vmx,
    read_vmx_text,
    vmx_escape,
    vmx_info,
)

POLL = 0.25  # seconds between looks at the serial files and the lock directory
VM_DIR = "vm"
VMWARE_MANIFEST = "vmware.json"


def vmrun_type() -> str:
    forced = os.environ.get("VMBUILD_VMRUN_TYPE")
    if forced:
        return forced
    return "fusion" if sys.platform == "darwin" else "ws"


class Vmrun:
    """``vmrun -T TYPE ...`` as coroutines (each call is one short-lived process)."""

    def __init__(self, host_type: str | None = None) -> None:
        binary = shutil.which("vmrun")
        if binary is None:
            raise RunnerError("vmrun is not on PATH (VMware Workstation/Player/Fusion)")
        self.binary = binary
        self.type = host_type or vmrun_type()

    async def __call__(self, *args: str, timeout: float | None = 600) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            self.binary, "-T", self.type, *args, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # a signal to the runner's group must not cut it short
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 124, f"vmrun {args[0]} timed out"
        return proc.returncode or 0, out.decode("utf-8", "replace").strip()

    async def running(self) -> list[str]:
        """Paths of the running VMs (``vmrun list``: "Total running VMs: N" + one a line)."""
        rc, out = await self("list", timeout=60)
        if rc != 0:
            raise RunnerError(f"vmrun list failed: {out}")
        lines = out.splitlines()
        if not lines or not lines[0].startswith("Total running VMs:"):
            raise RunnerError(f"unexpected vmrun list output: {out!r}")
        return [line.strip() for line in lines[1:] if line.strip()]


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == str(b)


class VmwareBackend(Backend):
    name = "vmware"

    def __init__(self, options: RunOptions, streams: JobStreams) -> None:
        super().__init__(options, streams)
        self.wd = Workdir(options.workdir)
        self.vm_dir = options.workdir / VM_DIR
        self.vmrun = Vmrun(options.vmware_type)
        self.vmx = self.vm_dir / options.vmx.name
        self.offsets = {"job": 0, "control": 0}
        self.serial_names = {"job": "job.log", "control": "control.log"}
        self.follower: asyncio.Task[None] | None = None
        self.suspend_mode = os.environ.get("VMBUILD_VMWARE_SUSPEND", "hard")
        self.resumed = False
        self.checkpointed = False

    # ---------------------------------------------------------------- preparation

    def _manifest(self) -> dict[str, Any] | None:
        return read_json(self.wd.path / VMWARE_MANIFEST, "VMware run record")

    def _publish(self, state: str) -> None:
        manifest = {"version": 1, "backend": "vmware", "vmx": f"{VM_DIR}/{self.vmx.name}",
                    "state": state, "offsets": self.offsets,
                    "events": self.streams.report.events, "published": time.time()}
        write_atomic(self.wd.path / VMWARE_MANIFEST,
                     json.dumps(manifest, indent=1).encode() + b"\n")

    def _fresh_copy(self) -> None:
        """Copy the image into vm/ (via a staging directory renamed into place), with the
        job's input and output disks added on the boot disk's controller."""
        src = self.options.vmx
        try:
            mapping = load_vmx(src)
            info = vmx_info(mapping)
        except (OSError, VmxError) as exc:
            raise RunnerError(f"{src}: {exc}", 2) from exc
        if not info.disks:
            raise RunnerError(f"{src}: the VM has no hard disk", 2)
        opts = self.options
        names = ["output.vmdk"]
        if opts.inputs or opts.args or opts.env:
            names.insert(0, "input.vmdk")
        placed = self._place_disks(src, mapping, info.disks[0], names)
        stage = self.wd.path / f".stage-vm-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        text, _enc = read_vmx_text(src)
        for disk in info.disks:
            shutil.copy2(src.parent / disk.file_name, stage / Path(disk.file_name).name)
        extra: dict[str, str] = {"uuid.action": "keep", "msg.autoAnswer": "TRUE"}
        for disk in placed:
            qcow = stage / f"{Path(disk.file_name).stem}.qcow2"
            if disk.file_name == "input.vmdk":
                jobio.make_input_disk(qcow, opts.inputs, opts.args, opts.env)
            else:
                jobio.make_output_disk(qcow, opts.output_size_mib)
            adapter = VMDK_ADAPTER_TYPES.get(disk.controller, "lsilogic")
            subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk",
                            "-o", f"adapter_type={adapter}", str(qcow),
                            str(stage / disk.file_name)], check=True)
            qcow.unlink()
            # No deviceType: VMware takes a .vmdk under a disk key as a hard disk
            # ("scsi-hardDisk" / "disk" are only needed for raw devices).
            extra[f"{disk.key}.present"] = "TRUE"
            extra[f"{disk.key}.fileName"] = disk.file_name
        for port in info.serial_ports:
            if port.number == 1:
                self.serial_names["job"] = Path(port.file_name).name
            if port.number == 2:
                self.serial_names["control"] = Path(port.file_name).name
        # Drop the keys being set and anything left under the units now taken (a stale
        # "scsi0:1.deviceType = cdrom-image" of an absent device would make a disk a CD).
        replaced = {k.lower() for k in extra}
        units = tuple(f"{disk.key.lower()}." for disk in placed)
        lines = [line for line in text.splitlines()
                 if (key := line.split("=", 1)[0].strip().lower()) not in replaced
                 and not key.startswith(units)]
        lines += [f'{key} = "{vmx_escape(value)}"' for key, value in extra.items()]
        (stage / src.name).write_text("\n".join(lines) + "\n")
        shutil.rmtree(self.vm_dir, ignore_errors=True)
        os.replace(stage, self.vm_dir)

    @staticmethod
    def _place_disks(src: Path, mapping: dict[str, str], boot: VmxDisk,
                     names: list[str]) -> list[VmxDisk]:
        """Give each extra disk a free unit on the boot disk's controller, under the key
        VMware reads (``VmxDisk.key``: ``scsiN:M`` for every SCSI kind, ``sataN:M``,
        ``nvmeN:M``). A disk under any other key is ignored by VMware, silently: the job
        would run without its inputs and its outputs would be lost."""
        prefix = controller_prefix(boot.controller)
        units = free_units(mapping, prefix, boot.bus)
        placed: list[VmxDisk] = []
        for name in names:
            unit = next(units, None)
            if unit is None:
                limit = UNIT_RANGES[prefix][0]
                raise RunnerError(
                    f"{src}: no free unit on {prefix}{boot.bus} (units {limit.start}-"
                    f"{limit.stop - 1}) for the job's {Path(name).stem} disk", 2)
            placed.append(VmxDisk(boot.controller, boot.bus, unit, name))
        return placed

    def _lock_dir(self) -> Path:
        return self.vmx.with_name(self.vmx.name + ".lck")

    async def _left_running(self) -> bool:
        if any(_same_file(p, self.vmx) for p in await self.vmrun.running()):
            return True
        return self._lock_dir().exists()

    async def start(self) -> None:
        self.wd.ensure()
        self.wd.collect([])
        manifest = self._manifest()
        if self.vmx.exists() and await self._left_running():
            log(f"{self.vmx} is still running (an earlier runner was killed); suspending it")
            rc, out = await self.vmrun("suspend", str(self.vmx), "hard")
            if rc != 0:
                log(f"suspend failed ({out}); stopping it")
                await self.vmrun("stop", str(self.vmx), "hard")
        vmss = list(self.vm_dir.glob("*.vmss")) if self.vm_dir.is_dir() else []
        if vmss and self.vmx.exists():
            self.resumed = True
            if manifest:
                self.offsets.update(manifest.get("offsets", {}))
                self.streams.restore(manifest.get("events", []))
            log(f"resuming the suspended VM ({vmss[0].name})")
        else:
            if manifest is not None or self.vm_dir.exists():
                log("no suspended state to resume; starting fresh")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.wd.path / VMWARE_MANIFEST)
            await asyncio.to_thread(self._fresh_copy)
        if self.streams.report.started:
            self.streams.started.set()
        self._read_serial_names()
        rc, out = await self.vmrun("start", str(self.vmx), "nogui")
        if rc != 0:
            raise RunnerError(f"vmrun start failed: {out}")
        self.follower = asyncio.create_task(self._follow())
        how = "resumed" if self.resumed else "started"
        log(f"{how} the VM under VMware ({self.vmrun.type})")

    def _read_serial_names(self) -> None:
        with contextlib.suppress(OSError, VmxError):
            info = vmx_info(load_vmx(self.vmx))
            for port in info.serial_ports:
                if port.number == 1:
                    self.serial_names["job"] = Path(port.file_name).name
                if port.number == 2:
                    self.serial_names["control"] = Path(port.file_name).name

    def _drain(self) -> None:
        sinks = {"job": self.streams.job_output, "control": self.streams.control}
        for key, sink in sinks.items():
            path = self.vm_dir / self.serial_names[key]
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[key])
                    data = f.read()
            except FileNotFoundError:
                continue
            if data:
                self.offsets[key] += len(data)
                sink(data)

    async def _follow(self) -> None:
        lock = self._lock_dir()
        seen_lock = False
        while True:
            self._drain()
            exists = lock.exists()
            seen_lock = seen_lock or exists
            if seen_lock and not exists:
                self._drain()
                self.exited.set()
                return
            await asyncio.sleep(POLL)

    # ---------------------------------------------------------------- actions

    async def checkpoint(self, leave: bool) -> None:
        t0 = time.monotonic()
        if self.follower is not None:
            self.follower.cancel()
        rc, out = await self.vmrun("suspend", str(self.vmx), self.suspend_mode)
        if rc != 0:
            if not self._lock_dir().exists():  # it powered off meanwhile: the job ended
                self._drain()
                self.exited.set()
                return
            raise RunnerError(f"vmrun suspend failed: {out}")
        self._drain()
        if not list(self.vm_dir.glob("*.vmss")):
            raise RunnerError("vmrun suspend returned but no .vmss was written")
        await asyncio.to_thread(self._publish, "suspended")
        self.checkpointed = True
        log(f"VM suspended in {time.monotonic() - t0:.1f}s")
        if not leave:
            rc, out = await self.vmrun("start", str(self.vmx), "nogui")
            if rc != 0:
                raise RunnerError(f"vmrun start (after a periodic checkpoint) failed: {out}")
            self.follower = asyncio.create_task(self._follow())

    async def pause(self) -> None:
        await self.vmrun("pause", str(self.vmx))

    async def unpause(self) -> None:
        await self.vmrun("unpause", str(self.vmx))

    async def poweroff(self) -> None:
        await self.vmrun("stop", str(self.vmx), "hard")

    async def finish(self, status: int) -> None:
        await self.deliver(status, self.vm_dir / "output.vmdk", self.wd.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.wd.path / VMWARE_MANIFEST)
        shutil.rmtree(self.vm_dir, ignore_errors=True)

    def vm_pid(self) -> int | None:
        from .chirp import vm_pid_for

        return vm_pid_for(self.vmx)

    async def close(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            await asyncio.gather(self.follower, return_exceptions=True)
