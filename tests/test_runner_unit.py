"""Fast tests of the runner: manifest publishing, garbage collection, argv building, signal
mapping, exit codes, the zipapp. No VM is booted here (see test_runner_qemu.py)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vmbuild.runner import core, main
from vmbuild.runner.bundle import write_bundle
from vmbuild.runner.contract import (
    EXIT_CHECKPOINTED,
    EXIT_JOB_TIMEOUT,
    EXIT_OUTPUTS_LOST,
    EXIT_VM_DIED,
    EXIT_VM_START_FAILED,
    JOB_OUTPUT_MARKER,
    JobReport,
)
from vmbuild.runner.qemu import blockdev_args, state_reader, state_writer
from vmbuild.runner.qemu_devices import BLOCKDEV, ExtraDrive, qemu_argv
from vmbuild.runner.vmx import vmx_info

VMX = {
    "memsize": "512", "numvcpus": "1", "guestos": "debian12-64", "virtualhw.version": "19",
    "scsi0.present": "TRUE", "scsi0.virtualdev": "pvscsi",
    "scsi0:0.present": "TRUE", "scsi0:0.filename": "disk.vmdk",
    "serial0.present": "TRUE", "serial0.filetype": "file", "serial0.filename": "console.log",
}


# ------------------------------------------------------------------ durations and signals


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1h30m", 5400.0),
    ("500ms", 0.5), ("1.5h", 5400.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert core.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10x", "0", "-5s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        core.parse_duration(text)


def test_parse_signals() -> None:
    assert core.parse_signals("USR1,TERM,SIGQUIT") == [
        signal.SIGUSR1, signal.SIGTERM, signal.SIGQUIT]
    assert core.parse_signals("") == []
    with pytest.raises(ValueError):
        core.parse_signals("NOPE")
    with pytest.raises(ValueError):
        core.parse_signals("KILL")
    with pytest.raises(ValueError):
        core.parse_signals("TSTP")


def test_signal_plan_sigint_follows_sigterm() -> None:
    plan = core.signal_plan([signal.SIGUSR1, signal.SIGTERM])
    assert signal.SIGINT in plan.checkpoint
    assert signal.SIGTERM in plan.checkpoint
    assert signal.SIGHUP in plan.stop
    plan = core.signal_plan([signal.SIGUSR1])
    assert {signal.SIGTERM, signal.SIGINT} <= plan.stop
    assert plan.pause == signal.SIGTSTP and plan.resume == signal.SIGCONT


# ------------------------------------------------------------------ exit codes


def test_exit_codes_are_the_interface() -> None:
    assert EXIT_CHECKPOINTED == 85
    assert (EXIT_VM_START_FAILED, EXIT_JOB_TIMEOUT, EXIT_VM_DIED) == (90, 91, 92)


def _report(*lines: dict[str, object]) -> JobReport:
    report = JobReport()
    report.feed("".join(json.dumps(x) + "\n" for x in lines))
    return report


def test_job_exit_status() -> None:
    done = _report({"event": "started"}, {"event": "exited", "status": 3})
    assert core.job_exit_status(done) == 3
    assert core.job_exit_status(_report({"event": "started"})) == EXIT_VM_DIED
    assert core.job_exit_status(_report({"event": "timeout", "status": 124})) == EXIT_JOB_TIMEOUT
    assert core.job_exit_status(_report({"event": "exited", "status": 999})) == EXIT_VM_DIED


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for code in ("85", "90", "91", "92"):
        assert f"  {code} " in text
    assert "SIGINT" in text and "TSTP" in text


def test_usage_errors(tmp_path: Path) -> None:
    assert main.main(["run", str(tmp_path / "missing.vmx")]) == 2
    vmx = tmp_path / "x.vmx"
    vmx.write_text("")
    assert main.main(["run", str(vmx), "--checkpoint-every", "soon"]) == 2
    assert main.main(["run", str(vmx), "--env", "NOEQUALS"]) == 2
    assert main.main(["run", str(vmx), "--checkpoint-signals", "BOGUS"]) == 2
    assert main.main(["frobnicate"]) == 2


def test_options_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vmx = tmp_path / "img.vmx"
    vmx.write_text("")
    monkeypatch.chdir(tmp_path)
    ns = main.build_parser().parse_args(
        ["run", str(vmx), "--input", "a", "b", "--input", "c", "--env", "K=v=w", "--arg", "x"])
    opts = main.options_from(ns)
    assert opts.workdir == tmp_path / "img.vmbuild-run"
    assert [str(p) for p in opts.inputs] == ["a", "b", "c"]
    assert opts.env == {"K": "v=w"} and opts.args == ["x"]
    assert opts.checkpoint_signals == [signal.SIGUSR1, signal.SIGTERM, signal.SIGQUIT]
    assert opts.checkpoint_exit_code == 85


# ------------------------------------------------------------------ manifest and GC


def _manifest(files: dict[str, list[str]], state: str) -> dict[str, object]:
    return {"disks": {d: {"layers": [{"file": f} for f in fs], "size": 1}
                      for d, fs in files.items()}, "state": state}


def test_publish_and_load(tmp_path: Path) -> None:
    wd = core.Workdir(tmp_path)
    for name in ("base.qcow2", "l1.qcow2", "state-1.mig"):
        (tmp_path / name).write_bytes(b"x")
    assert wd.load_manifest() is None
    wd.publish(_manifest({"system": ["base.qcow2", "l1.qcow2"]}, "state-1.mig"))
    loaded = wd.load_manifest()
    assert loaded is not None
    assert loaded["version"] == core.MANIFEST_VERSION
    assert core.manifest_files(loaded) == ["base.qcow2", "l1.qcow2", "state-1.mig"]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    # names are relative: nothing in the manifest mentions the directory
    assert str(tmp_path) not in (tmp_path / core.MANIFEST).read_text()


def test_load_refuses_missing_files(tmp_path: Path) -> None:
    wd = core.Workdir(tmp_path)
    (tmp_path / "base.qcow2").write_bytes(b"x")
    (tmp_path / "s.mig").write_bytes(b"x")
    wd.publish(_manifest({"system": ["base.qcow2"]}, "s.mig"))
    (tmp_path / "s.mig").unlink()
    with pytest.raises(core.RunnerError, match="missing"):
        wd.load_manifest()


def test_load_refuses_garbage_and_traversal(tmp_path: Path) -> None:
    wd = core.Workdir(tmp_path)
    (tmp_path / core.MANIFEST).write_text("{not json")
    with pytest.raises(core.RunnerError):
        wd.load_manifest()
    with pytest.raises(core.RunnerError):
        wd.file("../etc/passwd")


def test_collect_keeps_referenced_and_foreign_files(tmp_path: Path) -> None:
    wd = core.Workdir(tmp_path)
    names = ["base.qcow2", "l1.qcow2", "l2-killed.qcow2", "state-1.mig", "state-2.mig",
             ".checkpoint.json.123.tmp", "notes.txt", "job.log", "result.json"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".stage-input-abc").mkdir()
    manifest = _manifest({"system": ["base.qcow2", "l1.qcow2"]}, "state-1.mig")
    wd.publish(manifest)
    removed = wd.collect(core.manifest_files(manifest))
    assert sorted(removed) == sorted([
        ".checkpoint.json.123.tmp", ".stage-input-abc", "l2-killed.qcow2", "state-2.mig"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["base.qcow2", "l1.qcow2", "state-1.mig", "notes.txt", "job.log",
                           "result.json", core.MANIFEST])


def test_retire(tmp_path: Path) -> None:
    wd = core.Workdir(tmp_path)
    (tmp_path / "s.mig").write_bytes(b"x")
    wd.publish({"disks": {}, "state": "s.mig"})
    wd.retire()
    assert wd.load_manifest() is None


# ------------------------------------------------------------------ QEMU argv


def test_blockdev_chain_is_explicit_and_relocatable(tmp_path: Path) -> None:
    args, top = blockdev_args(tmp_path, "system", ["base.qcow2", "l1.qcow2"], "top.qcow2")
    specs = [json.loads(a) for a in args[1::2]]
    assert args[0::2] == ["-blockdev"] * 3
    assert [s["node-name"] for s in specs] == ["system-0", "system-1", "system-2"]
    assert [s["backing"] for s in specs] == [None, "system-0", "system-1"]
    assert [s.get("read-only", False) for s in specs] == [True, True, False]
    assert specs[2]["file"]["filename"] == str(tmp_path / "top.qcow2")
    assert top == "system-2"


def test_qemu_argv_with_blockdev_nodes(tmp_path: Path) -> None:
    info = vmx_info(VMX)
    argv = qemu_argv(info, tmp_path, disk_override={"disk.vmdk": ("system-1", BLOCKDEV)},
                     extra_drives=[ExtraDrive("output-1", BLOCKDEV, False)],
                     serial_paths=["chardev:socket,fd=7"])
    text = " ".join(argv)
    assert "-drive" not in argv  # the runner defines every disk node itself
    assert "scsi-hd,bus=scsi0.0,scsi-id=0,lun=0,drive=system-1,bootindex=0" in text
    assert "drive=output-1" in text
    assert "socket,fd=7,id=serial0" in text


# ------------------------------------------------------------------ zipapp


def test_bundle_runs_with_plain_python(tmp_path: Path) -> None:
    target = tmp_path / "vmbuild-run.pyz"
    write_bundle(target)
    names = zipfile.ZipFile(target).namelist()
    assert "__main__.py" in names and "vmbuild/runner/qemu.py" in names
    assert "qemu/qmp/qmp_client.py" in names
    build_side = ("vmbuild/recipe", "vmbuild/pipeline", "vmbuild/stages", "vmbuild/cli")
    assert not any(n.startswith(build_side) for n in names)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    proc = subprocess.run([python, "-I", str(target), "run", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint" in proc.stdout
    # the QEMU backend (and qemu.qmp) import from the archive alone
    code = f"import sys; sys.path.insert(0, {str(target)!r}); import vmbuild.runner.qemu"
    proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_runner_does_not_import_the_build_side() -> None:
    code = ("import sys, vmbuild.runner.main, vmbuild.runner.qemu, vmbuild.runner.core;"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('yaml', 'typer', 'ansible_runner') or m in ('vmbuild.recipe', 'vmbuild.pipeline')"
            " or m.startswith('vmbuild.stages')];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the core's lifecycle


class FakeBackend(core.Backend):
    """Records what the core asks for; the "guest" is driven by the test."""

    def __init__(self, options: core.RunOptions, streams: core.JobStreams,
                 fail_start: bool = False) -> None:
        super().__init__(options, streams)
        self.calls: list[str] = []
        self.fail_start = fail_start

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise core.RunnerError("no hypervisor")

    async def checkpoint(self, leave: bool) -> None:
        self.calls.append("checkpoint-leave" if leave else "checkpoint")
        self.checkpointed = True
        if leave:
            self.exited.set()

    async def pause(self) -> None:
        self.calls.append("pause")

    async def unpause(self) -> None:
        self.calls.append("unpause")

    async def poweroff(self) -> None:
        self.calls.append("poweroff")
        self.exited.set()

    async def finish(self, status: int) -> None:
        self.calls.append(f"finish {status}")


def _drive(tmp_path: Path, script: object, fail_start: bool = False,
           **opts: object) -> tuple[int, FakeBackend, bytes]:
    import asyncio
    import io

    options = core.RunOptions(vmx=tmp_path / "x.vmx", workdir=tmp_path, **opts)  # type: ignore[arg-type]
    out = io.BytesIO()

    async def go() -> tuple[int, FakeBackend]:
        streams = core.JobStreams(tmp_path, stdout=out)
        backend = FakeBackend(options, streams, fail_start)
        task = asyncio.ensure_future(script(backend))  # type: ignore[operator]
        rc = await core.drive(backend, options)
        await task
        streams.close()
        return rc, backend

    rc, backend = asyncio.run(go())
    return rc, backend, out.getvalue()


def _guest_says(backend: core.Backend, *events: dict[str, object]) -> None:
    backend.streams.control("".join(json.dumps(e) + "\n" for e in events).encode())


def test_drive_job_status_and_output(tmp_path: Path) -> None:
    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started", "boot_id": "b1"})
        b.streams.job_output(b"firmware noise\n" + JOB_OUTPUT_MARKER.encode() + b"1\n")
        b.streams.job_output(b"2\n")
        _guest_says(b, {"event": "exited", "status": 3})
        b.exited.set()

    rc, backend, out = _drive(tmp_path, script)
    assert rc == 3
    assert out == b"1\n2\n"
    assert backend.calls == ["start", "finish 3"]
    assert (tmp_path / "job.log").read_bytes() == b"1\n2\n"


def test_drive_vm_died_and_failed_start(tmp_path: Path) -> None:
    async def died(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"})
        b.exited.set()

    assert _drive(tmp_path, died)[0] == EXIT_VM_DIED

    async def nothing(b: core.Backend) -> None:
        return None

    rc, backend, _ = _drive(tmp_path, nothing, fail_start=True)
    assert rc == EXIT_VM_START_FAILED and backend.calls == ["start"]


def test_drive_checkpoint_signal_pause_and_resume(tmp_path: Path) -> None:
    import asyncio
    import os

    async def script(b: core.Backend) -> None:
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTSTP)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGCONT)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    rc, backend, _ = _drive(tmp_path, script, checkpoint_exit_code=99)
    assert rc == 99
    assert backend.calls == ["start", "pause", "unpause", "checkpoint-leave"]


def test_drive_sigint_acts_as_sigterm(tmp_path: Path) -> None:
    import asyncio
    import os

    async def script(b: core.Backend) -> None:
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    rc, backend, _ = _drive(tmp_path, script)
    assert rc == EXIT_CHECKPOINTED and backend.calls[-1] == "checkpoint-leave"
    rc, backend, _ = _drive(tmp_path, script, checkpoint_signals=[signal.SIGUSR1])
    assert rc == 128 + signal.SIGINT and backend.calls[-1] == "poweroff"


def test_drive_periodic_checkpoints(tmp_path: Path) -> None:
    """Periodic checkpoints keep coming while the job runs (the VM is not left). Waits for
    three of them, however long a loaded machine takes, instead of counting what fits into
    a fixed time."""
    import asyncio

    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"})
        assert isinstance(b, FakeBackend)
        deadline = asyncio.get_running_loop().time() + 120
        while b.calls.count("checkpoint") < 3:
            assert asyncio.get_running_loop().time() < deadline, b.calls
            await asyncio.sleep(0.05)
        _guest_says(b, {"event": "exited", "status": 0})
        b.exited.set()

    rc, backend, _ = _drive(tmp_path, script, checkpoint_every=0.1, timeout=3600)
    assert rc == 0
    assert backend.calls.count("checkpoint") >= 3
    assert "checkpoint-leave" not in backend.calls and backend.calls[-1] == "finish 0"


def test_drive_timeout_while_checkpointing_periodically(tmp_path: Path) -> None:
    """The job's timeout still ends the run (exit 91, VM powered off) while periodic
    checkpoints are being taken."""
    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"})

    rc, backend, _ = _drive(tmp_path, script, checkpoint_every=0.1, timeout=0.45)
    assert rc == EXIT_JOB_TIMEOUT
    assert backend.calls[-1] == "poweroff"


def test_drive_exit_after_periodic_checkpoint(tmp_path: Path) -> None:
    """HTCondor self-checkpointing: the periodic checkpoint ends the run with code 85."""
    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"})

    rc, backend, _ = _drive(tmp_path, script, checkpoint_every=0.1, exit_after_checkpoint=True)
    assert rc == EXIT_CHECKPOINTED
    assert backend.calls == ["start", "checkpoint-leave"]


def test_drive_ignores_checkpoint_signal_after_the_job_ended(tmp_path: Path) -> None:
    import asyncio
    import os

    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"}, {"event": "exited", "status": 0})
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.1)
        b.exited.set()

    rc, backend, _ = _drive(tmp_path, script)
    assert rc == 0 and "checkpoint-leave" not in backend.calls


def test_one_runner_per_workdir(tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / core.LOCK, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        (tmp_path / "image").mkdir()
        vmx = tmp_path / "image" / "x.vmx"
        vmx.write_text("")
        rc = main.main(["run", str(vmx), "--workdir", str(tmp_path), "--backend", "qemu"])
        assert rc == EXIT_VM_START_FAILED


@pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                    reason="needs qemu-img and qemu-io")
def test_compact_chain_keeps_the_data(tmp_path: Path) -> None:
    from vmbuild.runner.qemu import compact_chain, create_layer

    def img(*args: str) -> str:
        return subprocess.run(args, cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout

    img("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    img("qemu-io", "-c", "write -P 0x11 0 1M", "base.qcow2")
    below = "base.qcow2"
    for n, pattern in enumerate(("0x22", "0x33", "0x44"), start=1):
        create_layer(tmp_path, f"l{n}.qcow2", below, 4 * 2**20)
        img("qemu-io", "-c", f"write -P {pattern} {n}M 512k", f"l{n}.qcow2")
        below = f"l{n}.qcow2"
    merged = compact_chain(tmp_path, "system", ["base.qcow2", "l1.qcow2", "l2.qcow2",
                                                "l3.qcow2"])
    assert "Images are identical" in img("qemu-img", "compare", "l3.qcow2", merged)
    info = json.loads(img("qemu-img", "info", "--output=json", merged))
    assert info["backing-filename"] == "base.qcow2"  # relative: the directory can move
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    out = subprocess.run(["qemu-io", "-c", "read -P 0x44 3M 512k", merged], cwd=moved,
                         capture_output=True, text=True, check=True).stdout
    assert "read 524288/524288" in out


def test_drive_start_timeout(tmp_path: Path) -> None:
    async def never_starts(b: core.Backend) -> None:
        return None

    rc, backend, _ = _drive(tmp_path, never_starts, start_timeout=0.2)
    assert rc == EXIT_VM_START_FAILED and backend.calls[-1] == "poweroff"


def test_a_workdir_holding_the_image_is_refused(tmp_path: Path) -> None:
    """Garbage collection owns *.vmdk in a work dir: the image must never be in one."""
    vmx = tmp_path / "hello.vmx"
    vmx.write_text("")
    (tmp_path / "hello.vmdk").write_bytes(b"precious")
    rc = main.main(["run", str(vmx), "--workdir", str(tmp_path), "--backend", "qemu"])
    assert rc == 2
    assert (tmp_path / "hello.vmdk").read_bytes() == b"precious"


# ------------------------------------------------------------------ issue 11: exit 93, refusals


class _LosingBackend(FakeBackend):
    """A backend whose outputs could not be returned: finish() decides the exit status."""

    async def finish(self, status: int) -> int:  # type: ignore[override]
        self.calls.append(f"finish {status}")
        return EXIT_OUTPUTS_LOST


def test_drive_returns_the_status_finish_decides(tmp_path: Path) -> None:
    import asyncio

    options = core.RunOptions(vmx=tmp_path / "x.vmx", workdir=tmp_path)

    async def go() -> tuple[int, _LosingBackend]:
        streams = core.JobStreams(tmp_path, quiet=True)
        backend = _LosingBackend(options, streams)
        _guest_says(backend, {"event": "started", "boot_id": "b1"},
                    {"event": "exited", "status": 0})
        backend.exited.set()
        rc = await core.drive(backend, options)
        streams.close()
        return rc, backend

    rc, backend = asyncio.run(go())
    assert rc == EXIT_OUTPUTS_LOST == 93
    assert backend.calls == ["start", "finish 0"]
    assert backend.outcome is not None and backend.outcome.status == 93
    assert "93" in core.EXIT_CODES_HELP and "outputs" in core.EXIT_CODES_HELP


def _escaping_image(tmp_path: Path, disk: str, **extra: str) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    (image / "disk.vmdk").write_bytes(b"")
    vmx = image / "x.vmx"
    keys = {**VMX, "scsi0:0.filename": disk, **extra}
    vmx.write_text("".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    return vmx


@pytest.mark.parametrize("backend", ["qemu", "vmware"])
def test_run_refuses_a_disk_outside_the_image(tmp_path: Path, backend: str,
                                              capfd: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    standin = Path(__file__).parent / "standin"  # VMware's vmrun, as test_runner_vmware uses
    monkeypatch.setenv("PATH", f"{standin}{os.pathsep}{os.environ['PATH']}")
    vmx = _escaping_image(tmp_path, "/etc/shadow")
    work = tmp_path / "work"
    rc = main.main(["run", str(vmx), "--workdir", str(work), "--backend", backend,
                    "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capfd.readouterr().err
    assert "scsi0:0.fileName '/etc/shadow' is an absolute path" in err
    assert "refusing to run it" in err
    made = sorted(p.name for p in work.rglob("*")) if work.exists() else []
    assert not [name for name in made if name.endswith((".qcow2", ".vmdk", ".raw", ".vmx"))]
    assert not (tmp_path / "out").exists()


def test_outside_files_sees_links_climbs_serials_nvram_and_extents(tmp_path: Path) -> None:
    import os

    from vmbuild.runner.vmx import load_vmx, outside_files
    from vmbuild.stages.artifact import lint_vmx

    vmx = _escaping_image(tmp_path, "linked.vmdk", **{
        "serial1.present": "TRUE", "serial1.filetype": "file",
        "serial1.filename": "../job.log", "nvram": "/var/lib/x.nvram"})
    os.symlink("/etc/shadow", vmx.parent / "linked.vmdk")
    problems = outside_files(vmx, load_vmx(vmx))
    assert any("scsi0:0.fileName 'linked.vmdk' is a symbolic link" in p for p in problems)
    assert any("serial1.fileName '../job.log' climbs out" in p for p in problems)
    assert any("nvram '/var/lib/x.nvram' is an absolute path" in p for p in problems)
    assert any("symbolic link" in p for p in lint_vmx(vmx, qemu_img=None))

    # A text descriptor whose extent is a host file outside the image.
    (vmx.parent / "linked.vmdk").unlink()
    (vmx.parent / "linked.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 16 FLAT "/etc/shadow" 0\n')
    problems = outside_files(vmx, load_vmx(vmx))
    assert any("its extent '/etc/shadow' is an absolute path" in p for p in problems)

    # A self-contained image is fine.
    fine = tmp_path / "fine"
    fine.mkdir()
    (fine / "disk.vmdk").write_text('# Disk DescriptorFile\nRW 16 FLAT "disk-flat.vmdk" 0\n')
    (fine / "x.vmx").write_text("".join(f'{k} = "{v}"\n' for k, v in VMX.items()))
    assert outside_files(fine / "x.vmx", load_vmx(fine / "x.vmx")) == []


# ------------------------------------------------------------------ a full disk at a checkpoint


def _saving_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    outcome: str) -> tuple[object, list[str]]:
    """A QemuBackend with a published checkpoint 3, its QMP replaced by a recorder; the
    migration ends with ``outcome`` ("completed", or "failed" after ``cat`` hit ENOSPC)."""
    import asyncio
    import os
    import types

    from vmbuild.runner import qemu

    for name in ("base.qcow2", "l1.qcow2", "top.qcow2", "state-3.mig"):
        (tmp_path / name).write_bytes(b"x")
    wd = core.Workdir(tmp_path)
    wd.publish({"sequence": 3, "disks": {"system": {
        "layers": [{"file": "base.qcow2", "base": True}, {"file": "l1.qcow2"}], "size": 1}},
        "state": "state-3.mig"})
    options = core.RunOptions(vmx=tmp_path / "x.vmx", workdir=tmp_path, keep_base=True)
    streams = core.JobStreams(tmp_path, quiet=True)
    backend = qemu.QemuBackend(options, streams)
    backend.info = vmx_info(VMX)
    backend.manifest = wd.load_manifest()
    assert backend.manifest is not None
    backend.chains = {d: {"layers": list(c["layers"]), "size": c["size"]}
                      for d, c in backend.manifest["disks"].items()}
    backend.state_file = "state-3.mig"
    backend.tops = {"system": "top.qcow2"}
    backend.top_nodes = {"system": "system-2"}
    backend.node_count = {"system": 3}
    calls: list[str] = []

    async def cmd(name: str, **args: object) -> None:
        calls.append(name)
        if name == "migrate":  # `zstd -o FILE` (or `cat > FILE`) writes part, then fails
            argv = shlex.split(str(args["uri"]).removeprefix("exec:"))
            path = argv[argv.index("-o") + 1] if "-o" in argv else argv[-1]
            Path(path).write_bytes(b"partial")

    async def done() -> str:
        return outcome

    async def quit_() -> None:
        calls.append("quit")
        backend.exited.set()

    def layer(workdir: Path, name: str, backing: str, size: int) -> None:
        (workdir / name).write_bytes(b"layer over " + backing.encode())

    monkeypatch.setattr(backend, "_cmd", cmd)
    monkeypatch.setattr(backend, "_migration_done", done)
    monkeypatch.setattr(backend, "_quit", quit_)
    monkeypatch.setattr(qemu, "create_layer", layer)
    if outcome != "completed":  # `cat` stopped when the filesystem had no space left
        monkeypatch.setattr(os, "statvfs",
                            lambda path: types.SimpleNamespace(f_bavail=3, f_frsize=4096))
    del asyncio
    return backend, calls


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Checkpoint-and-exit on a full work directory: the published manifest (3) and its
    files stand untouched, the partial state file is gone, the VM is stopped, and the
    runner says which checkpoint the next run resumes."""
    import asyncio

    from vmbuild.runner import qemu

    backend, calls = _saving_backend(tmp_path, monkeypatch, "failed")
    assert isinstance(backend, qemu.QemuBackend)
    before = (tmp_path / core.MANIFEST).read_bytes()
    asyncio.run(backend.checkpoint(leave=True))
    assert calls == ["stop", "migrate", "quit"]
    assert (tmp_path / core.MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("state-*.mig")) == ["state-3.mig"]
    assert not backend.checkpointed
    failure = backend.checkpoint_failure or ""
    assert "checkpoint 4 not saved" in failure and "filesystem is full" in failure
    assert "previous checkpoint (3) is kept" in failure
    assert "checkpoint 4 not saved" in capfd.readouterr().err
    loaded = core.Workdir(tmp_path).load_manifest()
    assert loaded is not None and loaded["sequence"] == 3


def test_full_disk_during_a_periodic_checkpoint_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic save that fails lets the VM continue; the layer it froze meanwhile stays
    in the chain, so the next save that works names it (no torn chain)."""
    import asyncio

    from vmbuild.runner import qemu

    backend, calls = _saving_backend(tmp_path, monkeypatch, "failed")
    assert isinstance(backend, qemu.QemuBackend)
    asyncio.run(backend.checkpoint(leave=False))
    assert calls == ["stop", "blockdev-add", "blockdev-snapshot", "migrate", "cont"]
    assert backend.checkpoint_failure and "previous checkpoint (3)" in \
        backend.checkpoint_failure
    assert [x["file"] for x in backend.chains["system"]["layers"]] == \
        ["base.qcow2", "l1.qcow2", "top.qcow2"]
    assert json.loads((tmp_path / core.MANIFEST).read_text())["sequence"] == 3

    monkeypatch.setattr(backend, "_migration_done",
                        lambda: asyncio.sleep(0, result="completed"))
    calls.clear()
    asyncio.run(backend.checkpoint(leave=False))
    assert backend.checkpoint_failure is None and backend.checkpointed
    published = core.Workdir(tmp_path).load_manifest()
    assert published is not None and published["sequence"] == 4
    layers = [x["file"] for x in published["disks"]["system"]["layers"]]
    assert layers[:3] == ["base.qcow2", "l1.qcow2", "top.qcow2"] and len(layers) == 4
    assert not (tmp_path / "state-3.mig").exists()  # the old state went with its manifest


def test_manifest_write_on_a_full_filesystem_leaves_the_old_one(tmp_path: Path) -> None:
    """A real ENOSPC (a 1 MiB tmpfs in a private user and mount namespace, no root): the
    manifest's publication fails cleanly, the previous manifest stands, no temporary file
    is left behind."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    code = (
        "import errno, json, os, sys\n"
        "from pathlib import Path\n"
        "from vmbuild.runner import core\n"
        "d = Path(sys.argv[1])\n"
        "(d / 's1.mig').write_bytes(b'x')\n"
        "wd = core.Workdir(d)\n"
        "wd.publish({'sequence': 1, 'disks': {}, 'state': 's1.mig'})\n"
        "fd = os.open(d / 'fill', os.O_WRONLY | os.O_CREAT)\n"
        "try:\n"
        "    while True:\n"
        "        os.write(fd, b'\\0' * 4096)\n"
        "except OSError as exc:\n"
        "    assert exc.errno == errno.ENOSPC\n"
        "os.close(fd)\n"
        "try:\n"
        "    wd.publish({'sequence': 2, 'disks': {}, 'state': 's1.mig',\n"
        "                'events': ['x' * 100000]})\n"
        "except OSError as exc:\n"
        "    assert exc.errno == errno.ENOSPC, exc\n"
        "else:\n"
        "    raise SystemExit('published on a full filesystem')\n"
        "assert wd.load_manifest()['sequence'] == 1\n"
        "assert not [p for p in os.listdir(d) if p.endswith('.tmp')], os.listdir(d)\n"
        "print('ok')\n")
    script = 'mount -t tmpfs -o size=1m vmbuild-test "$1" && exec "$2" -c "$3" "$1"'
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           script, "sh", str(mnt), sys.executable, code],
                          capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stdout + proc.stderr


def test_drive_exits_85_when_the_checkpoint_could_not_be_saved(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The work directory still resumes (the previous checkpoint), so a scheduler should run
    the job again: exit 85, and the log does not claim a new checkpoint."""
    import asyncio
    import os

    async def script(b: core.Backend) -> None:
        _guest_says(b, {"event": "started"})
        b.checkpoint_failure = "checkpoint 4 not saved (full); the previous checkpoint " \
            "(3) is kept and the next run resumes from it"
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    rc, backend, _ = _drive(tmp_path, script)
    assert rc == EXIT_CHECKPOINTED and backend.calls[-1] == "checkpoint-leave"
    err = capfd.readouterr().err
    assert "exiting without a new checkpoint" in err and "checkpoint published" not in err


def test_checkpoint_signals_after_the_run_do_not_kill_the_runner(tmp_path: Path) -> None:
    """A storm of SIGUSR1 (a scheduler repeating its soft kill) that outlasts the checkpoint
    must not end the runner by the signal's default action instead of exit 85: the runner's
    own process ignores the checkpoint signals once its run is over (run_backend)."""
    code = (
        "import asyncio, os, signal, sys\n"
        "from pathlib import Path\n"
        "from vmbuild.runner import core\n"
        "class Saving(core.Backend):\n"
        "    async def start(self): os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    async def checkpoint(self, leave):\n"
        "        self.checkpointed = True\n"
        "        self.exited.set()\n"
        "    async def close(self):\n"
        "        for _ in range(5):  # the storm goes on while the runner leaves\n"
        "            os.kill(os.getpid(), signal.SIGUSR1)\n"
        "            os.kill(os.getpid(), signal.SIGQUIT)\n"
        "        await asyncio.sleep(0)\n"
        "work = Path(sys.argv[1])\n"
        "options = core.RunOptions(vmx=work.parent / 'x.vmx', workdir=work)\n"
        "rc = core.run_backend(Saving, options)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "work")],
                          capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == EXIT_CHECKPOINTED, proc.stderr


def test_vm_state_is_written_through_zstd_when_the_host_has_it(tmp_path: Path) -> None:
    """The migration URIs QEMU runs through /bin/sh: paths quoted, the reader chosen by the
    file's name, and a compressed state that really round-trips through them."""
    odd = tmp_path / "it's a dir; rm -rf ~"
    odd.mkdir()
    plain = odd / "state-1.mig"
    assert state_writer(plain, None) == "exec:cat > " + shlex.quote(str(plain))
    assert state_reader(plain) == "exec:cat " + shlex.quote(str(plain))
    zstd = shutil.which("zstd")
    assert zstd, "zstd is installed by scripts/setup.sh"
    packed = odd / "state-2.mig.zst"
    payload = bytes(4 << 20) + os.urandom(4096)  # mostly zeros, like a guest's memory
    subprocess.run(["/bin/sh", "-c", state_writer(packed, zstd).removeprefix("exec:")],
                   input=payload, check=True)
    assert packed.stat().st_size < len(payload) // 100
    back = subprocess.run(["/bin/sh", "-c", state_reader(packed).removeprefix("exec:")],
                          capture_output=True, check=True).stdout
    assert back == payload
    assert core._OWNED.match(packed.name)  # a killed run's leftover is collected
