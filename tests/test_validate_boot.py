"""The boot test as a researcher meets it: long jobs, input-driven jobs, and failures that say
what went wrong (a reboot, a kernel panic, a timeout). Real boots of the hello image under
QEMU; the boot-time settings reach the guest on the input disk only (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_vmbuild

pytestmark = pytest.mark.slow


def validate(vmx: Path, *args: str | Path) -> tuple[int, dict[str, object], str]:
    proc = run_vmbuild("validate", vmx, "--json", *args, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    final = lines[-1] if lines else {}
    return proc.returncode, final, proc.stderr


def test_until_started_stops_a_long_job_and_says_how_long_it_ran(hello_vmx: Path) -> None:
    code, final, stderr = validate(
        hello_vmx, "--command", "echo long job begins; sleep 36000", "--until", "started",
        "--running-for", "8s", "--expect-output", "^long job begins$")
    assert code == 0, stderr
    proof = final["result"]["validation"]  # type: ignore[index]
    assert proof["mode"] == "started"
    assert proof["ran_for"] >= 8
    # The shutdown reached the job as SIGTERM (status 143), and the wrapper still said so.
    assert proof["status"] == 143


def test_inputs_environment_and_expected_output(hello_vmx: Path, tmp_path: Path) -> None:
    data = tmp_path / "numbers"
    data.mkdir()
    (data / "a.txt").write_text("1\n2\n39\n")
    code, final, stderr = validate(
        hello_vmx, "--input", data, "--env", "FACTOR=1",
        "--command", 'echo "sum=$(( $(paste -sd+ "$VMBUILD_INPUT/numbers/a.txt") * FACTOR ))"',
        "--expect-output", r"^sum=42$")
    assert code == 0, stderr
    assert final["result"]["validation"]["mode"] == "exit"  # type: ignore[index]
    # The same boot expecting another answer fails, and says which line it wanted.
    code, final, stderr = validate(
        hello_vmx, "--input", data, "--command", 'cat "$VMBUILD_INPUT/numbers/a.txt"',
        "--expect-output", r"^sum=")
    assert code == 3
    assert "no line of the job's output matched '^sum='" in stderr


# What a job finds under vmbuild-init (hello is built with guest.init: job): PID 1 is the
# init, not systemd, and the file systems, host name and loopback a job relies on are there;
# Python's multiprocessing needs /dev/shm for its locks.
INIT_CHECKS = " && ".join([
    'test "$(cat /proc/1/comm)" = init',
    'test "$(cat /proc/sys/kernel/hostname)" = hello',
    "grep -q ' /run tmpfs ' /proc/mounts && test -d /run/lock",
    "test $(ulimit -H -n) = 524288",  # open files as systemd gives a service
    "grep -q ' /dev/shm tmpfs ' /proc/mounts",
    "grep -q ' /dev/pts devpts ' /proc/mounts",
    'test "$(readlink /dev/fd)" = /proc/self/fd',
    "test $(( $(cat /sys/class/net/lo/flags) & 1 )) = 1",
    "python3 -c 'import multiprocessing; multiprocessing.Lock()'",
    "echo init-ok",
])


def test_a_job_under_vmbuild_init_finds_what_it_relies_on(hello_vmx: Path,
                                                          tmp_path: Path) -> None:
    manifest = json.loads((hello_vmx.parent / "manifest.json").read_text())
    assert manifest["guest"]["init"] == "job"
    code, final, stderr = validate(hello_vmx, "--command", INIT_CHECKS,
                                   "--expect-output", "^init-ok$", "--logs", tmp_path)
    assert code == 0, stderr
    assert final["result"]["validation"]["status"] == 0  # type: ignore[index]
    # Nothing on the way complained: under `quiet`, after GRUB the console carries only the
    # kernel's own lines and the wrapper's. (vmbuild-init once asked busybox for an applet
    # Debian's static build lacks; every boot printed the error, and the test above passed.)
    console = (tmp_path / "console.log").read_text(errors="replace")
    after_grub = console.split("Booting `", 1)[1].splitlines()[1:]
    strays = [line for line in after_grub
              if line.strip() and not line.startswith(("[", "vmbuild-job: "))]
    assert strays == [], console[-3000:]


def test_the_image_itself_is_unchanged_by_a_validation_boot(hello_vmx: Path) -> None:
    before = hello_vmx.with_suffix(".vmdk").stat()
    code, _, stderr = validate(hello_vmx, "--command", "echo changed > /opt/hello/main.py")
    assert code == 0, stderr
    after = hello_vmx.with_suffix(".vmdk").stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)


@pytest.mark.parametrize(("command", "cause"), [
    ("echo rebooting; sync; echo b > /proc/sysrq-trigger; sleep 60", "the guest rebooted"),
    ("echo panicking; sync; echo c > /proc/sysrq-trigger; sleep 60",
     "the guest kernel panicked"),
    ("echo working forever; sleep 36000",
     "the job was still running at the boot test's timeout (60s)"),
    ("exit 3", "the job exited with status 3 (expected 0)"),
])
def test_a_failed_boot_names_its_cause(hello_vmx: Path, command: str, cause: str) -> None:
    code, final, stderr = validate(hello_vmx, "--command", command, "--timeout", "60s")
    assert code == 3, stderr
    assert cause in stderr
    assert cause in str(final.get("error"))
    assert "last console lines" in stderr
