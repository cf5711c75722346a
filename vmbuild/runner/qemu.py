"""The QEMU backend: boots the image's ``.vmx`` machine under QEMU and checkpoints it.

Disks. The image's VMDK is converted once to a qcow2 base in the work directory (QEMU
refuses to migrate a VM whose disk is a VMDK); an image shipped in its transport form
(``NAME.vmdk.zst``, :mod:`.transport`) is expanded into the work directory first, and the
base is named by the expanded disk's content key, the same as the plain VMDK's, so a
checkpoint finds its base whichever form the next sandbox got. Both are removed when the
runner leaves, unless ``--keep-base``. Every disk (system, inputs, outputs) is a
chain of qcow2 layers: frozen layers, each matching a published checkpoint, and one
writable top layer. The runner builds each chain explicitly with ``-blockdev`` (the backing
of every layer is given by node name, not read from the file), so a work directory moved to
another path resumes there; the layer headers name their backing files relatively only so
that ``qemu-img`` can read a chain too.

Checkpoint. QMP ``stop``; for a periodic checkpoint, every disk's top layer is frozen by
putting a new empty layer on top of it (``blockdev-add`` + ``blockdev-snapshot``), for a
checkpoint-and-exit the top layer itself is frozen (the VM never runs again); ``migrate``
to ``exec:cat > FILE`` saves the VM state, matching the frozen layers exactly; everything is
fsync'ed and the manifest naming the layers and the state file is published by an atomic
rename. Resume: ``-incoming defer``, the frozen chains plus a fresh writable layer on each,
``migrate-incoming`` from the state file, ``cont``. The state goes through ``zstd -1`` when
the host has it (a guest's memory is mostly zeros and page cache: bench/runner.py measured
76 MiB instead of 218 for the 512 MiB counting guest); a ``.zst`` state file is read back
through ``zstd -d``, a plain one through ``cat``. Whatever a killed run wrote after its last
checkpoint sits in a top layer no manifest names, and is collected at the next start.

QEMU runs in its own session (a terminal's Ctrl-C or a scheduler's signal to the process
group reaches the runner only, which decides) and dies with the runner (PR_SET_PDEATHSIG).
The runner waits on QMP events, on the serial sockets and on the child; it never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient  # type: ignore[import-untyped,unused-ignore]

from . import jobio, transport
from .accel import best_accelerator, qemu_binary
from .contract import EXIT_VM_START_FAILED
from .core import (
    RESULT,
    Backend,
    JobStreams,
    RunnerError,
    RunOptions,
    Workdir,
    log,
    manifest_files,
    source_key,
)
from .qemu_devices import BLOCKDEV, ExtraDrive, qemu_argv
from .vmx import VmxError, VmxInfo, load_vmx, outside_files, vmx_info

PR_SET_PDEATHSIG = 1
QMP_TIMEOUT = 60.0
START_TIMEOUT = 120.0
MAX_LAYERS = 6  # frozen layers per disk before a resume merges them


# QMP SHUTDOWN reasons -> STOP_REASONS keys (anything else is the host's doing).
_SHUTDOWN_REASONS = {"guest-shutdown": "poweroff", "guest-reset": "reboot",
                     "guest-panic": "panic", "host-error": "crash"}

# Signals QEMU must not act on: a scheduler's soft kill (Slurm's requeue sends SIGTERM to
# every process of the job) is for the runner, which saves the VM before QEMU may go.
_SHIELDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the runner dies, even by SIGKILL; block the
    scheduler's soft-kill signals, which the runner alone handles (QEMU inherits the mask)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the runner died before prctl took effect
        os._exit(1)


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise RunnerError("qemu-img is needed (Debian package qemu-utils)")
    return found


def _img(*args: str) -> str:
    proc = subprocess.run([_qemu_img(), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RunnerError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def virtual_size(path: Path) -> int:
    info = json.loads(_img("info", "--output=json", "-U", str(path)))
    return int(info["virtual-size"])


def create_layer(workdir: Path, name: str, backing: str, size: int) -> None:
    """A new empty qcow2 ``name`` over ``backing`` (both names in ``workdir``); the backing
    is recorded relatively and not opened (it may be in use by QEMU)."""
    _img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
         str(workdir / name), str(size))


def compact_chain(workdir: Path, disk: str, layers: list[str]) -> str:
    """One new qcow2 holding what ``layers[1:]`` hold, over ``layers[0]``; returns its name.
    Names are relative to ``workdir`` (qemu-img runs there), so the result is relocatable."""
    merged = Workdir(workdir).unique(f"{disk}-merged", ".qcow2")
    # A copy of the top layer, rebased (safe mode: every cluster that differs between the
    # old chain and the base is written into it) onto the base. `convert -B` would not do:
    # it copies only the top layer's own clusters. The frozen layers are never modified.
    proc = subprocess.run(["cp", "--sparse=always", layers[-1], merged], cwd=workdir,
                          capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        proc = subprocess.run(
            [_qemu_img(), "rebase", "-q", "-b", layers[0], "-F", "qcow2", merged],
            cwd=workdir, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(workdir / merged)
        raise RunnerError(f"merging the disk layers of {disk} failed: {proc.stderr.strip()}")
    return merged


def blockdev_args(workdir: Path, disk: str, layers: list[str], top: str) -> tuple[list[str], str]:
    """``-blockdev`` arguments for one disk: frozen ``layers`` (bottom first, read-only)
    and the writable ``top``; returns them and the top node's name."""
    args: list[str] = []
    below: str | None = None
    for index, name in enumerate([*layers, top]):
        node = f"{disk}-{index}"
        spec: dict[str, Any] = {
            "driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(workdir / name)},
            "backing": below,
        }
        if name != top:
            spec["read-only"] = True
        else:
            spec["discard"] = "unmap"
        args += ["-blockdev", json.dumps(spec, separators=(",", ":"))]
        below = node
    assert below is not None
    return args, below


def state_writer(path: Path, zstd: str | None) -> str:
    """QEMU's migration URI that writes the VM state to `path` (zstd-compressed when the
    host has zstd: level 1 keeps the suspend within its second on one core)."""
    if zstd:
        return f"exec:{shlex.quote(zstd)} -q -1 -T1 -o {shlex.quote(str(path))}"
    return "exec:cat > " + shlex.quote(str(path))


def state_reader(path: Path) -> str:
    """The migration URI that reads a saved state back, by the file's name."""
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RunnerError(f"the checkpoint's VM state ({path.name}) is zstd-compressed "
                              "and this host has no zstd (install the zstd package)")
        return f"exec:{shlex.quote(zstd)} -q -d -c {shlex.quote(str(path))}"
    return "exec:cat " + shlex.quote(str(path))


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, options: RunOptions, streams: JobStreams) -> None:
        super().__init__(options, streams)
        self.wd = Workdir(options.workdir)
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.manifest: dict[str, Any] | None = None
        # disk name -> {"layers": [frozen...], "size": int}; plus the current top per disk
        self.chains: dict[str, dict[str, Any]] = {}
        self.tops: dict[str, str] = {}
        self.top_nodes: dict[str, str] = {}
        self.node_count: dict[str, int] = {}
        self.state_file: str | None = None
        self.migration: asyncio.Future[str] | None = None
        self.resumed = False
        self.started_at = time.monotonic()
        self.elapsed_before = 0.0
        self.checkpoints = 0
        self.info: VmxInfo
        self.accel = "tcg"
        self.quitting = False
        self.pumps: list[asyncio.Task[None]] = []
        self.watcher: asyncio.Task[None] | None = None
        self.free_at_failure: int | None = None  # bytes free when a save failed
        self.base_names: set[str] = set()  # the image's qcow2 base, once this run knows it

    # ---------------------------------------------------------------- preparation

    def _prepare_disks(self, vmx_path: Path) -> None:
        wd = self.wd
        wd.ensure()
        manifest = wd.load_manifest()
        info = self.info
        if manifest is not None:
            self.expansions = list(manifest.get("expansions", []))
            keep = manifest_files(manifest)
            wd.collect(keep + self._cached_base_names(manifest))
            self._ensure_bases(vmx_path, manifest)
            self.manifest = manifest
            self.chains = {d: {"layers": list(c["layers"]), "size": c["size"]}
                           for d, c in manifest["disks"].items()}
            self.state_file = manifest["state"]
            self.resumed = True
            self.elapsed_before = float(manifest.get("elapsed", 0.0))
            self.streams.restore(manifest.get("events", []))
            log(f"resuming from checkpoint {manifest.get('sequence')} "
                f"({len(self.chains)} disks, state {self.state_file})")
            if self.options.inputs or self.options.args or self.options.env:
                log("--input/--arg/--env are ignored: the resumed job already has its inputs")
        else:
            wd.collect(self._cached_base_names(None))
            if len(info.disks) != 1:
                raise RunnerError("the QEMU backend runs VMs with exactly one disk")
            base = self._convert_base(self._image_disk(vmx_path), None)
            self.chains["system"] = {"layers": [{"file": base, "base": True}],
                                     "size": virtual_size(wd.path / base)}
            opts = self.options
            if opts.wants_input_disk:
                name = wd.unique("input", ".qcow2")
                jobio.make_input_disk(wd.path / name, opts.inputs, opts.args, opts.env,
                                      command=opts.command, shell=opts.shell)
                self.chains["input"] = {"layers": [{"file": name}],
                                        "size": virtual_size(wd.path / name)}
            name = wd.unique("output", ".qcow2")
            jobio.make_output_disk(wd.path / name, opts.output_size_mib)
            self.chains["output"] = {"layers": [{"file": name}],
                                     "size": virtual_size(wd.path / name)}
        if self.manifest is not None and any(
                len(c["layers"]) > MAX_LAYERS for c in self.chains.values()):
            self._compact()
        for disk, chain in self.chains.items():
            top = wd.unique(f"{disk}-layer", ".qcow2")
            create_layer(wd.path, top, chain["layers"][-1]["file"], chain["size"])
            self.tops[disk] = top

    def _image_disk(self, vmx_path: Path) -> Path:
        """The image's VMDK: its own, or its transport form expanded in the work directory
        (once; a complete earlier expansion is reused)."""
        file_name = self.info.disks[0].file_name
        vmdk = vmx_path.parent / file_name
        if vmdk.is_file():
            return vmdk
        zst = transport.transport_file(vmx_path.parent, file_name)
        if zst is None:
            raise RunnerError(f"{vmdk}: the VM's disk is missing (and no {vmdk.name}"
                              f"{transport.SUFFIX} beside it)")
        disk, expansion = transport.expand(zst, self.wd.path)
        self.note_expansion(expansion)
        return disk

    def _convert_base(self, vmdk: Path, expected: str | None) -> str:
        """The image's disk as a qcow2 base in the work directory (QEMU cannot migrate a
        VM whose disk is a VMDK); `expected` is the name a checkpoint recorded."""
        base = f"base-{source_key(vmdk)}.qcow2"
        self.base_names.add(base)
        if expected is not None and base != expected:
            raise RunnerError(f"the checkpoint in {self.wd.path} belongs to another image "
                              f"(its disk was {expected}, {vmdk.name} is {base})")
        if not (self.wd.path / base).is_file():
            log(f"converting {vmdk.name} to qcow2 (the work directory's base layer)")
            tmp = self.wd.path / f".{base}.tmp"
            fmt = "vmdk" if vmdk.suffix.lower() == ".vmdk" else "raw"
            _img("convert", "-q", "-f", fmt, "-O", "qcow2", str(vmdk), str(tmp))
            os.replace(tmp, self.wd.path / base)
        return base

    def _ensure_bases(self, vmx_path: Path, manifest: dict[str, Any]) -> None:
        for chain in manifest["disks"].values():
            for layer in chain["layers"]:
                if layer.get("base") and not (self.wd.path / layer["file"]).is_file():
                    self._convert_base(self._image_disk(vmx_path), layer["file"])

    def _drop_bases(self) -> None:
        """Leave only what the job wrote: the base (and the image disk expanded from its
        transport form) is remade from the image on resume."""
        if self.options.keep_base:
            return
        for chain in self.chains.values():
            for layer in chain["layers"]:
                if layer.get("base"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.wd.path / layer["file"])
        with contextlib.suppress(AttributeError, IndexError):
            transport.drop(self.wd.path, self.options.vmx.parent,
                           [self.info.disks[0].file_name])

    def _compact(self) -> None:
        """Merge the frozen layers above each base into one (periodic checkpoints add a
        layer each). Offline, before QEMU starts: the merged layer is written and fsync'ed,
        then a manifest naming it replaces the old one; the old layers become garbage."""
        assert self.manifest is not None
        for disk, chain in self.chains.items():
            layers = chain["layers"]
            if len(layers) <= 2:
                continue
            merged = compact_chain(self.wd.path, disk, [layer["file"] for layer in layers])
            chain["layers"] = [layers[0], {"file": merged}]
        manifest = {**self.manifest, "disks": self.chains}
        self.wd.publish(manifest)
        self.manifest = manifest
        self.wd.collect([*manifest_files(manifest), *self._cached_base_names(manifest)])
        log(f"merged the checkpoint's disk layers ({', '.join(self.chains)})")

    def _cached_base_names(self, manifest: dict[str, Any] | None) -> list[str]:
        """The converted base of the current image is kept (a cache) even when unused, and
        so is the image disk expanded from its transport form, which names that base."""
        names = sorted(self.base_names)
        try:
            image_dir, file_name = self.options.vmx.parent, self.info.disks[0].file_name
        except (AttributeError, IndexError):
            return names
        vmdk = image_dir / file_name
        with contextlib.suppress(OSError, RunnerError):
            expanded = transport.kept_names(image_dir, [file_name])
            names += expanded
            if expanded:
                vmdk = self.wd.path / expanded[0] / Path(file_name).name
            names.append(f"base-{source_key(vmdk)}.qcow2")
        return names

    def _argv(self) -> tuple[list[str], list[int], dict[str, socket.socket]]:
        binary = qemu_binary()
        if binary is None:
            raise RunnerError("qemu-system-x86_64 is not installed")
        blockdevs: list[str] = []
        for disk, chain in self.chains.items():
            args, node = blockdev_args(self.wd.path, disk,
                                       [layer["file"] for layer in chain["layers"]],
                                       self.tops[disk])
            blockdevs += args
            self.top_nodes[disk] = node
            self.node_count[disk] = len(chain["layers"]) + 1
        extra = [ExtraDrive(self.top_nodes[d], BLOCKDEV, False)
                 for d in ("input", "output") if d in self.chains]
        ours: dict[str, socket.socket] = {}
        theirs: list[int] = []
        for name in ("qmp", "job", "control"):
            mine, child = socket.socketpair()
            ours[name] = mine
            theirs.append(child.fileno())
            ours[name + "-child"] = child
        console = "chardev:file,path=" + str(self.wd.path / "console.log").replace(",", ",,") \
            + ",append=on"
        if self.options.shell:  # the guest's root shell on the user's terminal
            console = "chardev:stdio,signal=off,mux=on"  # Ctrl-A X quits
        elif self.options.console:  # console.log and, live, the runner's stderr
            mine, child = socket.socketpair()
            ours["console"], ours["console-child"] = mine, child
            theirs.append(child.fileno())
            console = f"chardev:socket,fd={child.fileno()}"
        serial = [console,
                  f"chardev:socket,fd={ours['job-child'].fileno()}",
                  f"chardev:socket,fd={ours['control-child'].fileno()}"]
        # A saved VM resumes on the accelerator it was saved on (TCG and KVM CPU state
        # differ); only a fresh start probes.
        saved = (self.manifest or {}).get("accel")
        accel = saved if self.resumed and saved else self.options.accel or best_accelerator()
        self.accel = accel
        devices = qemu_argv(self.info, self.options.vmx.parent,
                            disk_override={self.info.disks[0].file_name:
                                           (self.top_nodes["system"], BLOCKDEV)},
                            serial_paths=serial, extra_drives=extra, accel=accel)
        argv = [binary, "-name", f"vmbuild-run,process=vmbuild-run-{self.info.display_name}",
                *blockdevs, *devices,
                "-chardev", f"socket,id=qmp,fd={ours['qmp-child'].fileno()}",
                "-mon", "chardev=qmp,mode=control",
                # A reboot or a kernel panic ends the VM (and says which, in QMP's SHUTDOWN
                # reason): a run-once job VM that reboots would run its job again.
                "-device", "pvpanic", "-action", "panic=shutdown",
                "-S", "-no-reboot"]
        if self.resumed:
            argv += ["-incoming", "defer"]
        return argv, theirs, ours

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        vmx_path = self.options.vmx
        try:
            mapping = load_vmx(vmx_path)
            self.info = vmx_info(mapping)
        except (OSError, VmxError) as exc:
            raise RunnerError(f"{vmx_path}: {exc}", 2) from exc
        if outside := outside_files(vmx_path, mapping):  # before any disk is read
            raise RunnerError("; ".join(outside) + "; refusing to run it", 2)
        await asyncio.to_thread(self._prepare_disks, vmx_path)
        argv, child_fds, socks = self._argv()
        parent = os.getpid()
        try:
            terminal = None if self.options.shell else subprocess.DEVNULL
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=terminal, stdout=terminal,
                stderr=open(self.wd.path / "qemu.log", "ab"),  # noqa: SIM115
                pass_fds=child_fds, start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent))
        except OSError as exc:
            raise RunnerError(f"cannot start QEMU: {exc}") from exc
        finally:
            for name in ("qmp-child", "job-child", "control-child", "console-child"):
                if name in socks:
                    socks.pop(name).close()
        self.pumps = [asyncio.create_task(self._pump(socks["job"], self.streams.job_output)),
                      asyncio.create_task(self._pump(socks["control"], self.streams.control))]
        if "console" in socks:
            self.pumps.append(asyncio.create_task(self._pump(socks["console"], self._console)))
        self.watcher = asyncio.create_task(self._watch_process())
        self.tasks += [*self.pumps, self.watcher]
        qmp = QMPClient("vmbuild-run")
        self.qmp = qmp
        try:
            await asyncio.wait_for(qmp.connect(socks["qmp"]), START_TIMEOUT)
        except Exception as exc:
            await self._kill()
            raise RunnerError(f"QEMU did not start: {exc} {self._qemu_log_tail()}",
                              EXIT_VM_START_FAILED) from exc
        self.tasks.append(asyncio.create_task(self._events()))
        await self._cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "events", "state": True}])
        await self._cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        if self.resumed:
            assert self.state_file is not None
            state = self.wd.path / self.state_file
            self.migration = asyncio.get_running_loop().create_future()
            await self._cmd("migrate-incoming", uri=state_reader(state))
            status = await self._migration_done()
            if status != "completed":
                await self._kill()
                raise RunnerError(f"resuming the saved VM state failed ({status})")
        await self._cmd("cont")
        log(("resumed" if self.resumed else "started") + f" the VM under QEMU ({argv[0]})")

    async def _cmd(self, name: str, **args: Any) -> Any:
        if self.qmp is None:
            raise RunnerError("QEMU is not running")
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args or None), QMP_TIMEOUT)
        except Exception as exc:
            if self.exited.is_set():
                raise RunnerError(f"QEMU is gone ({name})", EXIT_VM_START_FAILED) from exc
            raise RunnerError(f"QMP {name} failed: {exc}") from exc

    async def _events(self) -> None:
        assert self.qmp is not None
        with contextlib.suppress(Exception):
            async for event in self.qmp.events:
                data: dict[str, Any] = dict(event)
                kind = data["event"]
                if kind == "GUEST_PANICKED":
                    self.stop_reason = "panic"
                elif kind == "SHUTDOWN" and self.stop_reason is None:
                    self.stop_reason = _SHUTDOWN_REASONS.get(
                        str(data.get("data", {}).get("reason", "")), "host")
                if kind == "MIGRATION":
                    status = str(data["data"]["status"])
                    if status in ("completed", "failed", "cancelled") and \
                            self.migration is not None and not self.migration.done():
                        self.migration.set_result(status)

    async def _migration_done(self) -> str:
        assert self.migration is not None
        gone = asyncio.ensure_future(self.exited.wait())
        waiting: set[asyncio.Future[Any]] = {self.migration, gone}
        await asyncio.wait(waiting,
                           return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if self.migration.done():
            return self.migration.result()
        return "qemu-exited"

    async def _pump(self, sock: socket.socket, sink: Any) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                sink(data)
        finally:
            writer.close()

    def _console(self, data: bytes) -> None:
        """``--console``: the guest's console to console.log and, as it comes, to stderr."""
        with open(self.wd.path / "console.log", "ab") as f:
            f.write(data)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.buffer.write(data)
            sys.stderr.buffer.flush()

    def _qemu_log_tail(self) -> str:
        try:
            lines = (self.wd.path / "qemu.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return ("; QEMU said: " + " | ".join(lines[-5:])) if lines else ""

    async def _watch_process(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        if rc != 0 and not self.quitting:
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            self.vm_error = f"QEMU {how}{self._qemu_log_tail()}"
            if self.stop_reason in (None, "host"):
                self.stop_reason = "crash"
        # Let the serial pumps drain what QEMU wrote before it went.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.pumps, return_exceptions=True), 5)
        self.exited.set()

    async def _kill(self) -> None:
        self.quitting = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self.watcher is not None:
            await self.exited.wait()

    # ---------------------------------------------------------------- checkpoints

    async def checkpoint(self, leave: bool) -> None:
        t0 = time.monotonic()
        try:
            await self._cmd("stop")
        except RunnerError:
            if self.exited.is_set():
                return  # it powered off on its own: the job ended, nothing to save
            raise
        if self.streams.finished.is_set():
            # The job already reported its end: let the VM power off instead of saving it.
            await self._cmd("cont")
            await self.exited.wait()
            return
        sequence = (self.manifest or {}).get("sequence", 0) + 1
        log(f"saving checkpoint {sequence}")
        await asyncio.sleep(0.05)  # let the control pump take what the guest sent before
        try:
            manifest = await self._save(sequence, leave)
        except (RunnerError, OSError) as exc:
            # A full work directory (the state file is the big write) or a failed save:
            # the published manifest was never touched, so the previous checkpoint stands.
            self.checkpoint_failure = self._save_failed(sequence, exc)
            log(self.checkpoint_failure)
            if leave:
                await self._quit()
                self._drop_bases()
            elif not self.exited.is_set():
                await self._cmd("cont")  # a periodic save: the job goes on, tries again
            return
        self.checkpoint_failure = None
        size = sum((self.wd.path / n).stat().st_size for n in manifest_files(manifest))
        log(f"checkpoint {sequence} published in {time.monotonic() - t0:.1f}s "
            f"({size / 1048576:.0f} MiB in the work directory)")
        if leave:
            await self._quit()
            self._drop_bases()
        else:
            await self._cmd("cont")

    def _save_failed(self, sequence: int, exc: BaseException) -> str:
        """The line that says a save failed and what the work directory still holds."""
        why = str(exc)
        free = self.free_at_failure
        self.free_at_failure = None
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or \
            (free is not None and free < (1 << 20))
        if full:
            why = f"the work directory's filesystem is full: {why}"
        kept = (self.manifest or {}).get("sequence")
        after = (f"the previous checkpoint ({kept}) is kept and the next run resumes from it"
                 if kept else "there is no earlier checkpoint: the next run starts the job "
                 "afresh")
        return f"checkpoint {sequence} not saved ({why}); {after}"

    async def _save(self, sequence: int, leave: bool) -> dict[str, Any]:
        """Freeze the disks, save the VM state, publish the manifest; returns it. On an
        error nothing is published and the new state file is gone; layers frozen meanwhile
        stay in the chains (QEMU's chain holds them now: a later checkpoint names them)."""
        frozen = {d: self.tops[d] for d in self.chains}
        if not leave:
            for disk, chain in self.chains.items():
                new = self.wd.unique(f"{disk}-layer", ".qcow2")
                await asyncio.to_thread(create_layer, self.wd.path, new, self.tops[disk],
                                        chain["size"])
                node = f"{disk}-{self.node_count[disk]}"
                self.node_count[disk] += 1
                await self._cmd("blockdev-add", **{
                    "driver": "qcow2", "node-name": node, "discard": "unmap",
                    "file": {"driver": "file", "filename": str(self.wd.path / new)},
                    "backing": None})
                await self._cmd("blockdev-snapshot", node=self.top_nodes[disk], overlay=node)
                self.top_nodes[disk] = node
                self.tops[disk] = new
                chain["layers"].append({"file": frozen[disk]})
        zstd = shutil.which("zstd")
        state = self.wd.unique("state", ".mig.zst" if zstd else ".mig")
        try:
            self.migration = asyncio.get_running_loop().create_future()
            await self._cmd("migrate", uri=state_writer(self.wd.path / state, zstd))
            status = await self._migration_done()
            if status != "completed":
                raise RunnerError(f"saving the VM state failed ({status})")
            chains = {d: {"layers": list(c["layers"]) + ([{"file": frozen[d]}] if leave
                                                          else []),
                          "size": c["size"]} for d, c in self.chains.items()}
            manifest = {
                "sequence": sequence,
                "backend": "qemu",
                "state": state,
                "disks": chains,
                "events": self.streams.report.events,
                "boot_id": self.streams.boot_id,
                "elapsed": self.elapsed_before + time.monotonic() - self.started_at,
                "memory_mib": self.info.memory_mib,
                "accel": self.accel,
                "vmx": self.options.vmx.name,
                "expansions": self.expansions,
            }
            await asyncio.to_thread(self.wd.publish, manifest)
        except BaseException:
            # QEMU's `cat > FILE` (or zstd's) reports no errno (its stderr is not kept): a full
            # filesystem shows as (almost) no space left next to the partial state file.
            with contextlib.suppress(OSError):
                st = os.statvfs(self.wd.path)
                self.free_at_failure = st.f_bavail * st.f_frsize
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.wd.path / state)
            raise
        previous_state = self.state_file
        self.chains = chains
        self.state_file = state
        self.checkpoints += 1
        self.checkpointed = True
        self.manifest = manifest
        if previous_state and previous_state != state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.wd.path / previous_state)
        return manifest

    async def _quit(self) -> None:
        self.quitting = True
        with contextlib.suppress(RunnerError):
            await self._cmd("quit")
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            await self._kill()

    async def pause(self) -> None:
        await self._cmd("stop")

    async def unpause(self) -> None:
        await self._cmd("cont")

    async def poweroff(self) -> None:
        await self._quit()

    async def shutdown(self, grace: float) -> bool:
        try:
            await self._cmd("system_powerdown")
        except RunnerError:
            return self.exited.is_set()
        try:
            await asyncio.wait_for(self.exited.wait(), grace)
            return True
        except TimeoutError:
            await self._quit()
            return False

    async def finish(self, status: int) -> int:
        if self.vm_error and self.manifest is not None and not self.streams.finished.is_set():
            # QEMU itself died (killed, crashed), not the guest: the last published
            # checkpoint is intact and is not this boot's end. Keep it, so that running
            # again resumes it instead of throwing the job's progress away.
            kept = self.manifest.get("sequence")
            log(f"checkpoint {kept} is kept: run again on {self.wd.path} to resume from it "
                "(what the job did after it is lost)")
            result = {"status": status, "job_status": None, "checkpoint_kept": kept,
                      "vm_error": self.vm_error, "finished": time.time(),
                      **self.expansion_result()}
            (self.wd.path / RESULT).write_text(json.dumps(result, indent=1) + "\n")
            self._drop_bases()
            return status
        disk = self.wd.path / self.tops["output"] if "output" in self.tops else None
        final = await self.deliver(status, disk, self.wd.path)
        self.wd.retire()
        self.wd.collect(self._cached_base_names(None))
        self._drop_bases()
        return final

    def vm_pid(self) -> int | None:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc.pid
        return None

    def vm_memory_mib(self) -> int:
        return self.info.memory_mib

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self._kill()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

