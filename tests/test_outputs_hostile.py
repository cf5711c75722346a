"""Hostile output disks, made on the host without booting anything (issue 11, items 1-2).

The guest runs as root and owns its output disk byte for byte, so every test here builds
the disk a malicious or broken guest could leave behind — links out, devices, FIFOs, setuid
files, a huge sparse file, names with control characters, an extra ``..`` entry, a
directory loop, a name holding ``/``, a corrupt superblock or inode table — with
``mkfs.ext4 -d`` (as the runner makes its disks) plus ``debugfs -w`` and byte patches, and
checks what ``extract_outputs`` and ``Backend.deliver`` make of it: nothing outside
``--output-dir``, no special file on the host, the sparse file neither filling the disk nor
silently lost, a clear exit 93 when outputs could not be returned, and the dropped list.
No root needed: device nodes are made with debugfs, not mknod.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmbuild.runner import core, jobio
from vmbuild.runner.contract import EXIT_OUTPUTS_LOST

MIB = 1024 * 1024


def _debugfs_w(raw: Path, *requests: str) -> None:
    """Edit ``raw`` the way a crafted guest filesystem would look (no mount, no root). One
    session, so ``cd`` applies to what follows (debugfs ``mknod`` takes a bare name)."""
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(raw)], input="\n".join(requests),
                          capture_output=True, text=True, check=False)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("debugfs ")]
    assert not errors, (requests, errors)


def _disk(tmp_path: Path, stage: Path, size: int = 64 * MIB, *, csum: bool = True,
          edits: tuple[str, ...] = (), patch: tuple[bytes, bytes] | None = None,
          name: str = "output") -> tuple[Path, Path]:
    """(qcow2 output disk, its raw image) holding ``stage``, edited as a guest could."""
    raw = tmp_path / f"{name}.raw"
    if csum:
        jobio.make_ext4(raw, "VMBOUTPUT", stage, size)
    else:  # byte patches of directory blocks need no checksum to fix up
        with open(raw, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O",
                        "^has_journal,^metadata_csum", "-d", str(stage), str(raw)], check=True)
    if edits:
        _debugfs_w(raw, *edits)
    if patch is not None:
        data = raw.read_bytes()
        assert data.count(patch[0]) == 1, "the pattern to patch must be unique"
        raw.write_bytes(data.replace(patch[0], patch[1]))
    work = tmp_path / f"{name}-work"
    work.mkdir()
    qcow = work / f"{name}.qcow2"
    jobio.to_qcow2(raw, qcow)
    return qcow, raw


def _tree(root: Path) -> dict[str, os.stat_result]:
    return {os.path.relpath(os.path.join(d, n), root): os.lstat(os.path.join(d, n))
            for d, dirs, files in os.walk(root) for n in [*dirs, *files]}


def _assert_contained(out: Path) -> None:
    """Everything under ``out`` is a plain file, a directory or a link resolving inside it;
    nothing special, nothing setuid/setgid/sticky, everything owned by this user."""
    real_out = os.path.realpath(out)
    for rel, st in _tree(out).items():
        assert st.st_uid == os.getuid(), rel
        assert not st.st_mode & 0o7000, rel
        kind = stat.S_IFMT(st.st_mode)
        assert kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), rel
        if kind == stat.S_IFLNK:
            real = os.path.realpath(out / rel)
            assert real == real_out or real.startswith(real_out + "/"), (rel, real)


@pytest.fixture
def hostile_stage(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    (stage / "sub" / "deep").mkdir(parents=True)
    (stage / "result.txt").write_text("42\n")
    (stage / "sub" / "deep" / "data.bin").write_bytes(b"\x01\x02" * 5000)
    os.symlink("/etc/passwd", stage / "passwd")
    os.symlink("../../etc/shadow", stage / "sub" / "climb")
    os.symlink("result.txt", stage / "ok-link")
    os.symlink("../result.txt", stage / "sub" / "ok-up")
    os.symlink("..", stage / "sub" / "up")  # kept: it is the output directory itself
    os.symlink("up/..", stage / "sub" / "sneak")  # textually inside, really its parent
    os.mkfifo(stage / "fifo")
    setuid = stage / "setuid"
    setuid.write_text("#!/bin/sh\n")
    setuid.chmod(0o6755)
    (stage / "bell\x07name").write_text("x")
    (stage / "esc\x1b[2Jname").write_text("x")
    (stage / "café").write_text("utf-8 is fine\n")
    with open(stage / "sparse.img", "wb") as f:  # 32 MiB apparent, one block of data
        f.seek(16 * MIB)
        f.write(b"middle")
        f.truncate(32 * MIB)
    return stage


def assert_dropped_as_hostile(reasons: dict[str, str]) -> None:
    """The entries both hostile output disks (crafted on the host, written by a booted guest)
    hold, each listed with why it was not returned (or, setuid, returned without its bits)."""
    assert "absolute link" in reasons["passwd"]
    assert "outside the output directory" in reasons["sub/climb"]
    assert reasons["fifo"] == "a FIFO"
    assert reasons["chardev"] == "a character device"
    assert reasons["blockdev"] == "a block device"
    assert "control character" in reasons["bell\\x07name"]
    assert "control character" in reasons["esc\\x1b[2Jname"]
    assert "setuid" in reasons["setuid"]  # returned, its bits cleared

def test_hostile_entries_are_dropped_and_listed(tmp_path: Path, hostile_stage: Path) -> None:
    qcow, _raw = _disk(tmp_path, hostile_stage, 128 * MIB,
                       edits=("mknod chardev c 1 3", "mknod blockdev b 8 0", "cd sub",
                              "mknod null c 1 3"))
    out = tmp_path / "results"
    before = sorted(p.name for p in tmp_path.iterdir())
    got = jobio.extract_outputs(qcow, out)

    assert got.complete, got.problems
    reasons = {d["path"]: d["reason"] for d in got.dropped}
    assert_dropped_as_hostile(reasons)
    assert "through other links" in reasons["sub/sneak"]
    assert reasons["sub/null"] == "a character device"
    assert sorted(got.files) == ["café", "result.txt", "setuid", "sparse.img",
                                 "sub/deep/data.bin"]
    assert sorted(got.links) == ["ok-link", "sub/ok-up", "sub/up"]

    _assert_contained(out)
    assert (out / "result.txt").read_text() == "42\n"
    assert (out / "sub" / "deep" / "data.bin").read_bytes() == b"\x01\x02" * 5000
    assert (out / "ok-link").read_text() == "42\n"
    assert (out / "sub" / "ok-up").read_text() == "42\n"
    assert os.readlink(out / "sub" / "up") == ".."
    assert stat.S_IMODE((out / "setuid").stat().st_mode) == 0o755
    for gone in ("passwd", "fifo", "chardev", "blockdev", "sub/climb", "sub/sneak",
                 "sub/null", "lost+found"):
        assert not os.path.lexists(out / gone), gone
    # The sparse file is whole and still sparse on the host.
    sparse = out / "sparse.img"
    assert sparse.stat().st_size == 32 * MIB
    assert sparse.stat().st_blocks * 512 < 1 * MIB
    with open(sparse, "rb") as f:
        f.seek(16 * MIB)
        assert f.read(6) == b"middle"
    # Nothing was created beside the output directory; the staging area is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "results"})
    assert sorted(p.name for p in qcow.parent.iterdir()) == ["output.qcow2"]


def test_rerun_into_the_same_directory_replaces_files_not_through_links(
        tmp_path: Path, hostile_stage: Path) -> None:
    """A second extraction into a directory holding the first's outputs (and a link a user
    or an earlier run left) writes nothing through a link."""
    qcow, _raw = _disk(tmp_path, hostile_stage)
    out = tmp_path / "results"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, out / "sub")  # a directory name that is a link on the host
    got = jobio.extract_outputs(qcow, out)
    assert {"path": "sub", "reason": "the output directory already has a non-directory "
            "there"} in got.dropped
    assert list(victim.iterdir()) == []
    again = jobio.extract_outputs(qcow, out)
    assert again.files == got.files
    assert (out / "result.txt").read_text() == "42\n"


def test_sparse_file_beyond_the_disk_is_not_written(tmp_path: Path) -> None:
    """A 20 GiB sparse file on a 1 GiB disk: refused before a byte is written; exit 93."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "small.txt").write_text("kept\n")
    (stage / "huge").write_text("seed")
    qcow, _raw = _disk(tmp_path, stage, 1024 * MIB,
                       edits=(f"sif /huge size {20 * 1024 * MIB}",))
    out = tmp_path / "results"
    got = jobio.extract_outputs(qcow, out)
    assert got.limit == 1024 * MIB
    assert not got.complete
    assert any("huge" in p and "limit" in p for p in got.problems)
    assert [d["path"] for d in got.dropped] == ["huge"]
    assert not (out / "huge").exists()
    assert (out / "small.txt").read_text() == "kept\n"
    total = sum(st.st_blocks * 512 for st in _tree(out).values())
    assert total < 1 * MIB

    # An explicit limit applies the same way to dense files.
    limited = jobio.extract_outputs(qcow, tmp_path / "limited", limit=3)
    assert any("small.txt" in p for p in limited.problems)


def test_directory_loops_end(tmp_path: Path) -> None:
    """A directory hard-linked into itself and the root linked below itself: each directory
    is extracted once, the repeats are listed, the walk ends."""
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "sub" / "f").write_text("f\n")
    qcow, _raw = _disk(tmp_path, stage,
                       edits=("link /sub /sub/loop", "link / /sub/root", "link /sub /again"))
    out = tmp_path / "results"
    got = jobio.extract_outputs(qcow, out)
    assert got.complete, got.problems
    assert got.files == ["sub/f"]
    looped = {d["path"] for d in got.dropped if "reached twice" in d["reason"]}
    # "sub" is listed before "again" (linked later), so "again" is the repeat.
    assert looped == {"again", "sub/loop", "sub/root"}
    _assert_contained(out)


def test_extra_dotdot_entry_is_dropped(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "sub" / "qq").write_text("escape?\n")
    (stage / "sub" / "keep").write_text("keep\n")
    # The directory entry "qq" (name_len 2, type regular file) renamed "..".
    qcow, _raw = _disk(tmp_path, stage, csum=False, patch=(b"\x02\x01qq", b"\x02\x01.."))
    out = tmp_path / "results"
    got = jobio.extract_outputs(qcow, out)
    assert got.complete, got.problems
    assert {"path": "sub/..", "reason": "an extra entry named '..' (a crafted filesystem)"} \
        in got.dropped
    assert got.files == ["sub/keep"]
    assert not (tmp_path / "qq").exists() and not (out / "qq").exists()
    _assert_contained(out)


def test_slash_in_a_name_is_a_clear_failure(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "sub" / "a_b").write_text("x\n")
    (stage / "top.txt").write_text("top\n")
    qcow, _raw = _disk(tmp_path, stage, csum=False, patch=(b"\x03\x01a_b", b"\x03\x01a/b"))
    out = tmp_path / "results"
    got = jobio.extract_outputs(qcow, out)
    assert not got.complete
    assert any("'/' in a name" in p for p in got.problems)
    assert got.files == ["top.txt"]
    assert not (out / "a").exists()


def test_corrupt_superblock_is_a_clear_error(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "f").write_text("f\n")
    raw = tmp_path / "disk.raw"
    jobio.make_ext4(raw, "VMBOUTPUT", stage, 32 * MIB)
    with open(raw, "r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 1024)
    (tmp_path / "w").mkdir()
    qcow = tmp_path / "w" / "out.qcow2"
    jobio.to_qcow2(raw, qcow)
    with pytest.raises(core.RunnerError) as caught:
        jobio.extract_outputs(qcow, tmp_path / "results")
    assert caught.value.exit_code == EXIT_OUTPUTS_LOST
    assert "no readable filesystem" in str(caught.value)


def _root_inode_offset(raw: Path) -> int:
    """The byte offset of the block holding the root directory's inode."""
    def ask(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True,
                              text=True, check=True).stdout

    block_size = int(ask("stats").split("Block size:")[1].split()[0])
    block = int(ask("imap <2>").split("located at block")[1].split(",")[0])
    return block * block_size


@pytest.mark.parametrize("fill", [b"\xff", b"\x5a"])
def test_corrupt_inode_table_is_a_clear_error(tmp_path: Path, fill: bytes) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "f").write_text("f\n")
    raw = tmp_path / "disk.raw"
    jobio.make_ext4(raw, "VMBOUTPUT", stage, 32 * MIB)
    with open(raw, "r+b") as f:
        f.seek(_root_inode_offset(raw))
        f.write(fill * 1024)
    (tmp_path / "w").mkdir()
    qcow = tmp_path / "w" / "out.qcow2"
    jobio.to_qcow2(raw, qcow)
    out = tmp_path / "results"
    try:
        got = jobio.extract_outputs(qcow, out)
    except core.RunnerError as exc:
        assert exc.exit_code == EXIT_OUTPUTS_LOST
        assert str(exc)
    else:
        raise AssertionError(f"a root inode of {fill!r} bytes was read as {got}")
    if out.exists():
        _assert_contained(out)


# ------------------------------------------------------------------ deliver(): exit 93


class _Delivering(core.Backend):
    """Just enough of a backend to call the shared deliver()."""

    async def finish(self, status: int) -> int:
        raise NotImplementedError


def _deliver(tmp_path: Path, disk: Path | None, status: int = 0) -> tuple[int, dict[str, object]]:
    work = tmp_path / "run"
    work.mkdir(exist_ok=True)
    options = core.RunOptions(vmx=tmp_path / "x.vmx", workdir=work,
                              output_dir=tmp_path / "delivered")

    async def go() -> int:
        streams = core.JobStreams(work, quiet=True)
        try:
            return await _Delivering(options, streams).deliver(status, disk, work)
        finally:
            streams.close()

    final = asyncio.run(go())
    return final, json.loads((work / core.RESULT).read_text())


def test_deliver_lists_dropped_entries_and_keeps_the_status(
        tmp_path: Path, hostile_stage: Path, capfd: pytest.CaptureFixture[str]) -> None:
    qcow, _raw = _disk(tmp_path, hostile_stage, edits=("mknod chardev c 1 3",))
    final, result = _deliver(tmp_path, qcow, status=3)
    assert final == 3
    assert result["status"] == 3 and result["job_status"] == 3
    dropped = result["dropped"]
    assert isinstance(dropped, list)
    assert {"path": "chardev", "reason": "a character device"} in dropped
    err = capfd.readouterr().err
    assert "'chardev' dropped: a character device" in err
    assert "\x1b" not in err  # a guest's escape sequence never reaches the terminal


def test_deliver_ends_with_93_when_outputs_are_lost(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "huge").write_text("seed")
    qcow, _raw = _disk(tmp_path, stage, edits=(f"sif /huge size {20 * 1024 * MIB}",))
    final, result = _deliver(tmp_path, qcow, status=0)
    assert final == EXIT_OUTPUTS_LOST
    assert result["status"] == EXIT_OUTPUTS_LOST and result["job_status"] == 0
    outputs = result["outputs"]
    assert isinstance(outputs, dict) and outputs["complete"] is False
    assert any("huge" in p for p in outputs["problems"])
    assert "exit 93" in capfd.readouterr().err


def test_deliver_ends_with_93_on_an_unreadable_disk(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    raw = tmp_path / "w" / "garbage.raw"
    raw.write_bytes(b"not a filesystem" * 65536)
    qcow = tmp_path / "w" / "out.qcow2"
    jobio.to_qcow2(raw, qcow)
    final, result = _deliver(tmp_path, qcow, status=0)
    assert final == EXIT_OUTPUTS_LOST
    outputs = result["outputs"]
    assert isinstance(outputs, dict)
    assert "no readable filesystem" in outputs["problems"][0]


def test_deliver_without_output_dir_disk_is_not_a_failure(tmp_path: Path) -> None:
    final, result = _deliver(tmp_path, None, status=7)
    assert final == 7 and result["status"] == 7 and "outputs" not in result


# ------------------------------------------------------------------ a real guest does it


#: Run as the job (root) in the hello image, instead of its own command: the guest owns its
#: output disk byte for byte, so it mounts the disk itself and leaves every hostile kind of
#: entry on it, beside what the job wrapper then copies. Names are made with printf so
#: that the control characters reach the filesystem.
HOSTILE_JOB = r"""
set -eu
dev=$(blkid -L VMBOUTPUT)
mkdir -p /mnt/evil
mount "$dev" /mnt/evil
cd /mnt/evil
echo 42 > result.txt
ln -s /etc/passwd passwd
mkdir -p sub
ln -s ../../etc/shadow sub/climb
ln -s ../result.txt sub/ok-up
mknod chardev c 1 3
mknod blockdev b 8 0
mkfifo fifo
printf '#!/bin/sh\n' > setuid
chmod 6755 setuid
truncate -s 20G huge.img
printf x > "$(printf 'bell\007name')"
printf x > "$(printf 'esc\033[2Jname')"
cd /
umount /mnt/evil
echo hostile entries written
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/qemu-system-x86_64").exists(), reason="needs QEMU")
def test_a_booted_guest_writing_hostile_outputs(
        hello_vmx: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Issue 11's acceptance: a real guest's job writes a link to /etc/passwd, a ``../..``
    link, device nodes, a FIFO, a setuid file, a 20 GiB sparse file on a 64 MiB output disk
    and names with control characters. Nothing lands outside --output-dir, nothing special
    or setuid lands inside, the sparse file fills nothing, and the run ends 93 (outputs not
    all returned: the sparse file is over the disk's size) listing what was dropped, in
    result.json and on stderr."""
    from vmbuild.runner.qemu import QemuBackend

    out = tmp_path / "results"
    work = tmp_path / "work"
    beside = tmp_path / "beside"  # where a ../.. link out of the results would point
    beside.mkdir()
    options = core.RunOptions(vmx=hello_vmx, workdir=work, output_dir=out, output_size_mib=64,
                              command=["/bin/sh", "-c", HOSTILE_JOB], quiet=True)

    async def run() -> int:
        work.mkdir()
        streams = core.JobStreams(work, quiet=True)
        try:
            return await core.drive(QemuBackend(options, streams), options,
                                    install_signals=False)
        finally:
            streams.close()

    before = sorted(p.name for p in tmp_path.iterdir())
    passwd = Path("/etc/passwd").read_bytes()
    rc = asyncio.run(run())
    err = capfd.readouterr().err
    job = (work / "job.log").read_text(errors="replace")
    assert "hostile entries written" in job, job + err
    assert rc == EXIT_OUTPUTS_LOST, err

    result = json.loads((work / core.RESULT).read_text())
    assert result["status"] == EXIT_OUTPUTS_LOST and result["job_status"] == 0
    reasons = {d["path"]: d["reason"] for d in result["dropped"]}
    assert_dropped_as_hostile(reasons)
    assert "huge.img" in reasons
    assert any("huge.img" in p and "limit" in p for p in result["outputs"]["problems"])
    for name in ("passwd", "sub/climb", "chardev", "blockdev", "fifo", "huge.img"):
        assert f"output {name!r} dropped" in err, (name, err)
    assert "exit 93" in err and "\x1b" not in err

    # on the host: only plain files, directories and inside links, owned by us, no setuid
    _assert_contained(out)
    assert (out / "result.txt").read_text() == "42\n"
    assert (out / "sub" / "ok-up").read_text() == "42\n"
    assert stat.S_IMODE((out / "setuid").stat().st_mode) == 0o755
    for gone in ("passwd", "sub/climb", "chardev", "blockdev", "fifo", "huge.img"):
        assert not os.path.lexists(out / gone), gone
    assert sum(st.st_blocks * 512 for st in _tree(out).values()) < 1 * MIB
    # nothing beside the output and work directories; the host's files untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "results", "work"})
    assert list(beside.iterdir()) == []
    assert Path("/etc/passwd").read_bytes() == passwd
