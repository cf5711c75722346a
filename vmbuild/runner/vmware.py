"""The VMware backend: runs the image under VMware Workstation, Player or Fusion via ``vmrun``.

Disks. The image is never copied and never written: on a fresh start every disk of the
image gets a *child* (delta) VMDK in ``WORKDIR/vm/`` made with ``qemu-img create -f vmdk
-b IMAGE.vmdk`` (``system.vmdk`` for the boot disk), whose descriptor names the image's disk
in ``parentFileNameHint`` and carries its content ID in ``parentCID``. VMware opens a
delta disk's parent read-only and writes only to the child, so what the guest writes is all
the work directory holds. The VM's own ``.vmx`` (the image's, with the children and the
job's input and output disks) lives in ``WORKDIR/vm/`` too; the extra disks go on the boot
disk's controller under the device keys VMware reads (``scsi0:1``, ``sata0:1``,
``nvme0:1``), as VMDKs made with ``qemu-img`` from the ext4 images of :mod:`jobio` whose
``ddb.adapterType`` fits that controller. An image shipped in its transport form
(``NAME.vmdk.zst`` and no ``NAME.vmdk``, :mod:`.transport`) is expanded once into
``WORKDIR/expanded-KEY/NAME.vmdk``, a monolithicSparse VMDK that is then the children's
parent exactly as the image's own disk would be. It is removed when the runner leaves
(unless ``--keep-base``): a resume expands it again, byte for byte the same, so the content
key and the parent's CID still match.

Running. ``vmrun -T TYPE start VM.vmx nogui`` starts it; VMware's file-backed serial ports
write ``job.log`` and ``control.log`` beside the ``.vmx``, which the runner follows (reading
the files, no subprocess per look). Before every power-on those files are drained and
removed (the console's is appended to ``WORKDIR/console.log``), because VMware may *replace*
an existing serial file instead of appending to it, which would put the runner's read
offsets past the end and lose output and the job's exit event. The VM is gone when VMware
removes its ``.vmx.lck`` directory; a VM whose ``vmware-vmx`` died leaves the lock behind,
so every few seconds ``vmrun list`` is asked too, and a VM it no longer names ends the run
(exit 92) instead of a hang.

Checkpoint. ``vmrun suspend VM.vmx hard|soft`` writes the ``.vmss`` (and ``.vmem``; and
the ``.nvram`` under EFI is beside them); the runner waits (bounded) for VMware to release
the ``.vmx.lck``; when the runner leaves the VM suspended, the memory file goes through
``zstd -1`` (``.vmem.zst``, :mod:`.vmem`; expanded back before the resume); then it
publishes ``vmware.json`` atomically: the child disks with the content key of the image
disk each was made over (:func:`core.source_key`), the control events seen, and how many
resumes VMware refused. A checkpoint is therefore the children, the input and output
disks, the saved state and the manifest: the image stays where it is. On resume, the
image's content keys are checked first (another image is refused, exit 90, as by the QEMU
backend), the memory is expanded, and each child's ``parentFileNameHint`` is rewritten in
place to where the image is now, so a work directory moved to another path or machine,
with the image copied elsewhere, resumes there.

Degrading. VMware refuses to resume on a host whose CPU features differ from the saving
host's (and for other reasons). A ``vmrun start`` that fails while a suspended state exists
is a refused resume, unless VMware itself could not be used (its host service unreachable,
no license, a timeout: then the checkpoint is kept and the run exits 90). With
``--on-resume-failure restart`` (the default) the runner says so, discards the saved state,
makes new children over the image (the input disk is kept: the job gets the same inputs)
and starts the job afresh; ``result.json`` counts it (``resume_failures``).
``--on-resume-failure fail`` keeps the checkpoint and exits 90.

A runner killed while VMware suspends (the scheduler's hard kill came before a slow suspend
finished) does not lose the VM: VMware completes the suspend on its own, and the next start
sees the ``.vmss`` and resumes. A VM left *running* by a killed runner is detected at the
next start (``vmrun list`` names it) and suspended (stopped with its state kept; ``stop
hard`` if that fails) before the run continues, so two copies never run and no work is
thrown away. A ``.vmx.lck`` that no running VM owns (left by a crash, or brought from
another host) is removed at start: VMware would refuse to power the VM on.

Standard library only (plus ``qemu-img`` and e2fsprogs on the host for the disks).
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

from . import jobio, transport, vmem
from .core import (
    Backend,
    JobStreams,
    RunnerError,
    RunOptions,
    Workdir,
    log,
    read_json,
    source_key,
    write_atomic,
)
from .vmx import (
    UNIT_RANGES,
    VMDK_ADAPTER_TYPES,
    VmxDisk,
    VmxError,
    VmxInfo,
    controller_prefix,
    free_units,
    load_vmx,
    outside_files,
    read_vmx_text,
    vmx_escape,
    vmx_info,
)

POLL = 0.25  # seconds between looks at the serial files and the lock directory
LIVENESS_EVERY = 2.0  # seconds between `vmrun list` looks while the VM runs
LIVENESS_MISSES = 2  # consecutive looks not naming the VM before it counts as gone
LOCK_WAIT = 60.0  # seconds to wait for VMware to release the .vmx.lck after a suspend
VM_DIR = "vm"
VMWARE_MANIFEST = "vmware.json"
SYSTEM_CHILD = "system.vmdk"
SECTOR = 512
#: ``vmrun start`` failures that say nothing about the saved state (VMware's host service
#: unreachable, no license, our own timeout): a restart would fail the same way, so they
#: keep the checkpoint (exit 90) instead of discarding it.
_NOT_THE_STATE = ("unable to connect", "cannot connect", "timed out", "license",
                  "insufficient permission")


def vmrun_type() -> str:
    """``vmrun -T``'s host type for this host's product (Player is not Workstation); a host
    that cannot run an x86 guest at all (Fusion on Apple silicon) is refused up front."""
    forced = os.environ.get("VMBUILD_VMRUN_TYPE")
    if forced:
        return forced
    from .probe import detect_vmware, vmrun_host_type

    product = detect_vmware()
    if not product.x86:
        raise RunnerError("VMware on this host cannot run x86 guests (Fusion on Apple silicon "
                          "runs Arm guests only); use --backend qemu", 2)
    return vmrun_host_type(product) or ("fusion" if sys.platform == "darwin" else "ws")


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


# --------------------------------------------------------------------------- VMDK descriptors


def _descriptor_area(path: Path) -> tuple[int, int | None, bytes]:
    """Where a VMDK's descriptor is: ``(byte offset, capacity in bytes, text)``. A sparse
    extent (magic ``KDMV``) embeds it in its header area at ``descriptorOffset`` for
    ``descriptorSize`` sectors, NUL-padded; a text descriptor file is the whole file
    (capacity None: it can be rewritten as a new file)."""
    with open(path, "rb") as f:
        head = f.read(SECTOR)
        if head[:4] == b"KDMV":
            offset = int.from_bytes(head[28:36], "little") * SECTOR
            size = int.from_bytes(head[36:44], "little") * SECTOR
            if not offset or not size:
                raise RunnerError(f"{path}: a sparse VMDK without an embedded descriptor")
            f.seek(offset)
            return offset, size, f.read(size).split(b"\0", 1)[0]
        f.seek(0)
        text = f.read(1 << 20)
    if not text.lstrip().startswith(b"#") or b"\0" in text:
        raise RunnerError(f"{path}: not a VMDK this runner can read (no descriptor found)")
    return 0, None, text


def vmdk_fields(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a VMDK's descriptor (quotes removed)."""
    _offset, _size, text = _descriptor_area(path)
    fields: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            fields[key.strip()] = value.strip().strip('"')
    return fields


def set_parent_hint(child: Path, parent: Path) -> bool:
    """Make ``child``'s ``parentFileNameHint`` name ``parent`` (absolute); True if changed.

    ``qemu-img rebase`` cannot change a VMDK's backing file ("Operation not supported"),
    so the descriptor is edited where it is: for the monolithicSparse children this backend
    makes (qemu-img puts a 20-sector descriptor area at sector 1), the new text is written
    over the old in the same area, NUL-padded, without changing the file's size or any
    grain; only the text bytes that change are rewritten (a few hundred bytes, within the
    first page). Nothing else in the descriptor changes, so the CID chain stays valid."""
    target = str(parent)
    if '"' in target or "\n" in target:
        raise RunnerError(f"{parent}: VMware cannot name a parent disk whose path has a quote "
                          "or a newline in it")
    offset, capacity, raw = _descriptor_area(child)
    lines = raw.decode("utf-8").split("\n")
    found = False
    for index, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == "parentFileNameHint":
            if line.partition("=")[2].strip().strip('"') == target:
                return False
            lines[index] = f'parentFileNameHint="{target}"'
            found = True
    if not found:
        raise RunnerError(f"{child}: not a delta disk (its descriptor has no "
                          "parentFileNameHint)")
    new = "\n".join(lines).encode("utf-8")
    if capacity is None:  # a text descriptor file: a new file renamed over the old one
        write_atomic(child, new)
        return True
    if len(new) >= capacity:
        raise RunnerError(f"{child}: the path {target} does not fit in the disk's "
                          f"descriptor area ({capacity} bytes); move the image to a shorter "
                          "path")
    with open(child, "r+b") as f:
        f.seek(offset)
        f.write(new + b"\0" * max(0, len(raw) - len(new)))
        f.flush()
        os.fsync(f.fileno())
    return True


def make_child(parent: Path, child: Path, adapter: str) -> None:
    """A new empty delta VMDK ``child`` over ``parent`` (named by its absolute path). The
    parent is only read (its size and CID); VMware writes nothing but the child."""
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         f"adapter_type={adapter},hwversion=6", "-b", str(parent), "-F", "vmdk", str(child)],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RunnerError(f"qemu-img could not make a child disk over {parent}: "
                          f"{proc.stderr.strip()}")


# --------------------------------------------------------------------------- the backend


class VmwareBackend(Backend):
    name = "vmware"

    def __init__(self, options: RunOptions, streams: JobStreams) -> None:
        super().__init__(options, streams)
        self.wd = Workdir(options.workdir)
        self.vm_dir = options.workdir / VM_DIR
        self.vmrun = Vmrun(options.vmware_type)
        self.vmx = self.vm_dir / options.vmx.name
        self.offsets = {"job": 0, "control": 0}
        self.serial_names = {"console": "console.log", "job": "job.log",
                             "control": "control.log"}
        self.follower: asyncio.Task[None] | None = None
        self.suspend_mode = os.environ.get("VMBUILD_VMWARE_SUSPEND", "hard")
        self.resumed = False
        self.checkpointed = False
        # One record per child disk: device key, child file, the image disk it was made
        # over (as the image's .vmx names it) and that disk's content key.
        self.disks: list[dict[str, str]] = []
        # Image disks expanded from their transport form in this run: .vmx name -> VMDK.
        self.expanded: dict[str, Path] = {}

    # ---------------------------------------------------------------- preparation

    def _manifest(self) -> dict[str, Any] | None:
        return read_json(self.wd.path / VMWARE_MANIFEST, "VMware run record")

    def _publish(self, state: str) -> None:
        """Publish the run record (atomically). ``state``: ``suspended`` (a checkpoint: the
        ``.vmss`` beside the ``.vmx``) or ``fresh`` (children made, nothing saved yet)."""
        files = sorted(p.name for p in self.vm_dir.iterdir()
                       if p.is_file()) if self.vm_dir.is_dir() else []
        manifest = {"version": 1, "backend": "vmware", "vmx": f"{VM_DIR}/{self.vmx.name}",
                    "state": state, "disks": self.disks, "files": files,
                    "offsets": self.offsets, "events": self.streams.report.events,
                    "resume_failures": self.resume_failures, "expansions": self.expansions,
                    "published": time.time()}
        write_atomic(self.wd.path / VMWARE_MANIFEST,
                     json.dumps(manifest, indent=1).encode() + b"\n")

    def _image(self) -> tuple[dict[str, str], VmxInfo]:
        src = self.options.vmx
        try:
            mapping = load_vmx(src)
            info = vmx_info(mapping)
        except (OSError, VmxError) as exc:
            raise RunnerError(f"{src}: {exc}", 2) from exc
        if outside := outside_files(src, mapping):  # before any disk is read or copied
            raise RunnerError("; ".join(outside) + "; refusing to run it", 2)
        if not info.disks:
            raise RunnerError(f"{src}: the VM has no hard disk", 2)
        return mapping, info

    def _image_disk(self, disk: VmxDisk) -> Path:
        """The image's VMDK for ``disk``: its own, or its transport form expanded into the
        work directory (once; the children's parent is then that monolithicSparse VMDK)."""
        image_dir = self.options.vmx.parent
        path = Path(os.path.abspath(image_dir / disk.file_name))
        if path.is_file():
            return path
        if disk.file_name in self.expanded:
            return self.expanded[disk.file_name]
        zst = transport.transport_file(image_dir, disk.file_name)
        if zst is None:
            raise RunnerError(f"{path}: the image's disk ({disk.key}) is missing", 2)
        expanded, expansion = transport.expand(zst, self.wd.path)
        self.note_expansion(expansion)
        self.expanded[disk.file_name] = Path(os.path.abspath(expanded))
        return self.expanded[disk.file_name]

    def _image_disk_names(self) -> list[str]:
        try:
            return [disk.file_name for disk in self._image()[1].disks]
        except RunnerError:
            return []

    def _drop_expansions(self) -> None:
        """The runner leaves: the expanded image disks go (the image travels in, never back
        with the work directory), unless --keep-base. A resume expands them again, to the
        same bytes, so the children's parent content ID still matches."""
        if not self.options.keep_base:
            transport.drop(self.wd.path, self.options.vmx.parent, self._image_disk_names())
            self.expanded.clear()

    def _fresh_vm(self, reuse_input: Path | None = None) -> None:
        """Make vm/ (in a staging directory renamed into place): a child disk over each of
        the image's disks, the job's input and output disks on the boot disk's controller,
        and the .vmx naming them. ``reuse_input``: an input disk to keep (a restart after a
        refused resume runs the job on the inputs it was started with)."""
        src = self.options.vmx
        mapping, info = self._image()
        opts = self.options
        names = ["output.vmdk"]
        if opts.inputs or opts.args or opts.env or reuse_input is not None:
            names.insert(0, "input.vmdk")
        placed = self._place_disks(src, mapping, info.disks[0], names)
        stage = self.wd.path / f".stage-vm-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        text, _enc = read_vmx_text(src)
        extra: dict[str, str] = {"uuid.action": "keep", "msg.autoAnswer": "TRUE"}
        disks: list[dict[str, str]] = []
        for index, disk in enumerate(info.disks):
            parent = self._image_disk(disk)
            child = SYSTEM_CHILD if index == 0 else f"disk-{disk.key.replace(':', '-')}.vmdk"
            try:
                adapter = vmdk_fields(parent).get("ddb.adapterType", "")
            except (OSError, RunnerError):
                adapter = ""
            adapter = adapter or VMDK_ADAPTER_TYPES.get(disk.controller, "lsilogic")
            make_child(parent, stage / child, adapter)
            extra[f"{disk.key}.fileName"] = child
            disks.append({"key": disk.key, "child": child, "image_disk": disk.file_name,
                          "source_key": source_key(parent)})
        nvram = mapping.get("nvram")
        if nvram and (src.parent / nvram).is_file():  # EFI variables: VMware writes them
            shutil.copy2(src.parent / nvram, stage / Path(nvram).name)
            extra["nvram"] = Path(nvram).name
        for disk in placed:
            if disk.file_name == "input.vmdk" and reuse_input is not None:
                os.replace(reuse_input, stage / disk.file_name)
            else:
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
        self._serial_names_from(info)
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
        self.disks = disks

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

    def _relink_children(self) -> None:
        """Before a resume: check that the image is the one the children were made over
        (by content, not by path: a scheduler copies it to a new sandbox each time), then
        point each child's parentFileNameHint at where that disk is now."""
        if not self.disks:
            return  # a record from before child disks (the VM ran on a copy): nothing to do
        _mapping, info = self._image()
        by_key = {disk.key: disk for disk in info.disks}
        for record in self.disks:
            disk = by_key.get(record["key"])
            if disk is None:
                raise RunnerError(f"the checkpoint in {self.wd.path} belongs to another "
                                  f"image: {self.options.vmx} has no disk {record['key']}")
            parent = self._image_disk(disk)
            key = source_key(parent)
            if key != record["source_key"]:
                raise RunnerError(
                    f"the checkpoint in {self.wd.path} belongs to another image: its disk "
                    f"{record['key']} was made over {record['image_disk']} with content key "
                    f"{record['source_key']}, but {parent} has {key}. Run it with the image "
                    "it started with, or start the job in a new --workdir")
            child = self.vm_dir / record["child"]
            if not child.is_file():
                raise RunnerError(f"{child}: the checkpoint's child disk is missing")
            if set_parent_hint(child, parent):
                log(f"{record['child']}: its parent disk is now {parent}")
            cid = vmdk_fields(parent).get("CID", "").lower()
            parent_cid = vmdk_fields(child).get("parentCID", "").lower()
            if cid != parent_cid:
                raise RunnerError(f"{child} was made over a disk with content ID {parent_cid}, "
                                  f"but {parent} has {cid}: VMware would refuse the chain")

    def _lock_dir(self) -> Path:
        return self.vmx.with_name(self.vmx.name + ".lck")

    async def _listed(self) -> bool | None:
        """Whether ``vmrun list`` names this VM (None when vmrun could not say)."""
        try:
            return any(_same_file(p, self.vmx) for p in await self.vmrun.running())
        except RunnerError:
            return None

    async def _reclaim(self, keep_state: bool = True) -> None:
        """Before a power-on: a VM still running from an earlier run is suspended
        (``keep_state``) or stopped; a lock that no running VM owns is removed (a crashed
        ``vmware-vmx`` leaves it; VMware would refuse to power the VM on)."""
        if await self._listed():
            if keep_state:
                log(f"{self.vmx} is still running (an earlier runner was killed); suspending it")
                rc, out = await self.vmrun("suspend", str(self.vmx), "hard")
                if rc == 0:
                    await self._wait_lock_released()
                    return
                log(f"suspend failed ({out}); stopping it")
            await self.vmrun("stop", str(self.vmx), "hard")
            await self._wait_lock_released()
        lock = self._lock_dir()
        if lock.exists() and await self._listed() is False:
            log(f"removing {lock.name}: no running VM owns it (left by a VM that crashed or "
                "by another host)")
            shutil.rmtree(lock, ignore_errors=True)

    async def _wait_lock_released(self) -> None:
        """VMware releases the .vmx.lck when vmware-vmx is done with the VM's files, which
        may be after ``vmrun suspend`` returned; a checkpoint published before that could
        name files still being written. Wait, bounded: a lock still there after LOCK_WAIT
        with the VM no longer listed is stale (removed at the next start); one whose VM is
        still listed is an error (nothing is published)."""
        lock = self._lock_dir()
        deadline = time.monotonic() + LOCK_WAIT
        while lock.exists():
            if time.monotonic() >= deadline:
                if await self._listed():
                    raise RunnerError(f"VMware still runs {self.vmx} and holds its lock "
                                      f"{LOCK_WAIT:g}s after the suspend; nothing was published")
                log(f"{lock.name} is still there {LOCK_WAIT:g}s after the suspend, but no VM "
                    "runs: a stale lock (removed at the next start)")
                return
            await asyncio.sleep(0.1)

    def _forget_job(self) -> None:
        """The job restarts from the image: what the old boot reported no longer counts."""
        self.offsets = {"job": 0, "control": 0}
        self.streams.reset()

    async def start(self) -> None:
        _mapping, info = self._image()  # refuse an image naming outside files, first
        self.wd.ensure()
        self.wd.collect(transport.kept_names(self.options.vmx.parent,
                                             [disk.file_name for disk in info.disks]))
        manifest = self._manifest()
        if manifest is not None:
            self.resume_failures = int(manifest.get("resume_failures", 0))
            self.disks = list(manifest.get("disks", []))
            self.expansions = list(manifest.get("expansions", []))
        if self.vmx.exists():
            await self._reclaim()
        vmss = list(self.vm_dir.glob("*.vmss")) if self.vm_dir.is_dir() else []
        if vmss and self.vmx.exists():
            self.resumed = True
            if manifest:
                self.offsets.update(manifest.get("offsets", {}))
                self.streams.restore(manifest.get("events", []))
            log(f"resuming the suspended VM ({vmss[0].name})")
            await asyncio.to_thread(self._relink_children)
            for line in await asyncio.to_thread(vmem.unpack, self.vm_dir):
                log(line)
            self._read_serial_names()
        else:
            if manifest is not None or self.vm_dir.exists():
                log("no suspended state to resume; starting fresh")
            await asyncio.to_thread(self._fresh_vm)
        await asyncio.to_thread(self._serial_aside)
        await asyncio.to_thread(self._publish, "suspended" if self.resumed else "fresh")
        if self.streams.report.started:
            self.streams.started.set()
        rc, out = await self.vmrun("start", str(self.vmx), "nogui")
        if rc != 0 and self.resumed:
            rc, out = await self._resume_refused(out)
        if rc != 0:
            raise RunnerError(f"vmrun start failed: {out}")
        self.follower = asyncio.create_task(self._follow())
        how = "resumed" if self.resumed else "started"
        log(f"{how} the VM under VMware ({self.vmrun.type})")

    async def _resume_refused(self, message: str) -> tuple[int, str]:
        """VMware would not resume the saved state (a host whose CPU features differ, a
        newer product, ...): fail (exit 90, the checkpoint kept) or start the job afresh
        from the image, as ``--on-resume-failure`` says."""
        if any(words in message.lower() for words in _NOT_THE_STATE):
            raise RunnerError(f"vmrun start failed: {message} (VMware itself could not be "
                              f"used; the checkpoint stays in {self.wd.path})")
        if self.options.on_resume_failure == "fail":
            raise RunnerError(f"VMware refused to resume the suspended VM: {message} "
                              f"(--on-resume-failure fail: the checkpoint stays in "
                              f"{self.wd.path})")
        log(f"VMware refused to resume the suspended VM: {message}")
        log("starting the job afresh from the image (--on-resume-failure restart); what it "
            "did since it began is lost")
        self.resume_failures += 1
        await self._reclaim(keep_state=False)
        await asyncio.to_thread(self._serial_aside)
        self._forget_job()
        old_input = self.vm_dir / "input.vmdk"
        await asyncio.to_thread(self._fresh_vm, old_input if old_input.is_file() else None)
        self.resumed = False
        await asyncio.to_thread(self._publish, "fresh")
        return await self.vmrun("start", str(self.vmx), "nogui")

    def _serial_names_from(self, info: VmxInfo) -> None:
        for port in info.serial_ports:
            key = {0: "console", 1: "job", 2: "control"}.get(port.number)
            if key and port.file_name:
                self.serial_names[key] = Path(port.file_name).name

    def _read_serial_names(self) -> None:
        with contextlib.suppress(OSError, VmxError):
            self._serial_names_from(vmx_info(load_vmx(self.vmx)))

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

    def _serial_aside(self) -> None:
        """With the VM off: show what the serial files hold past what was shown, then
        remove them (the console's goes onto WORKDIR/console.log first), so the next
        power-on starts them empty and offset 0 is right whether VMware appends to an
        existing serial file or replaces it. Every checkpoint is published after this, so
        a published record's offsets are those of files that no longer exist: a run killed
        at any point never skips output the next power-on writes."""
        self._drain()
        for key in ("job", "control"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.vm_dir / self.serial_names[key])
            self.offsets[key] = 0
        console = self.vm_dir / self.serial_names["console"]
        with contextlib.suppress(FileNotFoundError):
            data = console.read_bytes()
            if data:
                with open(self.wd.path / "console.log", "ab") as f:
                    f.write(data)
            console.unlink()

    async def _follow(self) -> None:
        """Show the serial output as it comes; set ``exited`` when the VM is gone: its lock
        removed (it powered off), or ``vmrun list`` no longer naming it (its process died;
        a crashed vmware-vmx leaves its lock, so the lock alone would wait forever)."""
        lock = self._lock_dir()
        seen_lock = False
        next_look = time.monotonic() + LIVENESS_EVERY
        misses = 0
        while True:
            self._drain()
            exists = lock.exists()
            seen_lock = seen_lock or exists
            if seen_lock and not exists:
                self._drain()
                self.exited.set()
                return
            if time.monotonic() >= next_look:
                listed = await self._listed()
                misses = misses + 1 if listed is False else 0
                next_look = time.monotonic() + LIVENESS_EVERY
                if misses >= LIVENESS_MISSES:
                    self._drain()
                    if not self.streams.finished.is_set():
                        self.stop_reason = "crash"
                        self.vm_error = ("VMware no longer runs the VM (vmrun list does not "
                                         "name it) but it never powered off"
                                         + ("; its lock was left behind" if lock.exists()
                                            else ""))
                    self.exited.set()
                    return
            await asyncio.sleep(POLL)

    # ---------------------------------------------------------------- actions

    async def _stop_follower(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            await asyncio.gather(self.follower, return_exceptions=True)
            self.follower = None

    async def checkpoint(self, leave: bool) -> None:
        t0 = time.monotonic()
        await self._stop_follower()
        rc, out = await self.vmrun("suspend", str(self.vmx), self.suspend_mode)
        if rc != 0:
            if not self._lock_dir().exists() or await self._listed() is False:
                # It powered off meanwhile (the job ended); VMware may still be releasing
                # its lock, which must be gone before anything else touches the VM.
                await self._wait_lock_released()
                if not list(self.vm_dir.glob("*.vmss")):
                    self._drain()
                    self.exited.set()
                    return
            raise RunnerError(f"vmrun suspend failed: {out}")
        await self._wait_lock_released()
        await asyncio.to_thread(self._serial_aside)
        if not list(self.vm_dir.glob("*.vmss")):
            raise RunnerError("vmrun suspend returned but no .vmss was written")
        await asyncio.to_thread(self._publish, "suspended")
        packed = ""
        if leave:  # a checkpoint left behind: its memory compressed, the record says so
            packed = await asyncio.to_thread(self._pack_memory)
            await asyncio.to_thread(self._publish, "suspended")
        self.checkpointed = True
        size = sum(p.stat().st_size for p in self.vm_dir.iterdir() if p.is_file())
        log(f"VM suspended in {time.monotonic() - t0:.1f}s ({packed}{size / 1048576:.0f} MiB "
            "in the work directory)")
        if leave:
            await asyncio.to_thread(self._drop_expansions)
        else:
            rc, out = await self.vmrun("start", str(self.vmx), "nogui")
            if rc != 0:
                raise RunnerError(f"vmrun start (after a periodic checkpoint) failed: {out}")
            self.follower = asyncio.create_task(self._follow())

    def _pack_memory(self) -> str:
        """Compress the suspended VM's memory files (:mod:`.vmem`); the words for the log.
        A host without zstd, or a failed compression, keeps the memory as VMware wrote it:
        the checkpoint is valid either way, only larger."""
        zstd = shutil.which("zstd")
        if zstd is None:
            return "memory not compressed: this host has no zstd; "
        try:
            done = vmem.pack(self.vm_dir, zstd)
        except (RunnerError, OSError) as exc:
            log(f"the memory stays uncompressed in the checkpoint: {exc}")
            return ""
        return "".join(f"{item.describe()}; " for item in done)

    async def pause(self) -> None:
        await self.vmrun("pause", str(self.vmx))

    async def unpause(self) -> None:
        await self.vmrun("unpause", str(self.vmx))

    async def poweroff(self) -> None:
        await self.vmrun("stop", str(self.vmx), "hard")

    async def finish(self, status: int) -> int:
        await self._stop_follower()
        await asyncio.to_thread(self._serial_aside)
        final = await self.deliver(status, self.vm_dir / "output.vmdk", self.wd.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.wd.path / VMWARE_MANIFEST)
        shutil.rmtree(self.vm_dir, ignore_errors=True)
        await asyncio.to_thread(self._drop_expansions)
        return final

    def vm_pid(self) -> int | None:
        from .chirp import vm_pid_for

        return vm_pid_for(self.vmx)

    async def close(self) -> None:
        await self._stop_follower()
