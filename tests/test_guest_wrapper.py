"""The in-guest job wrapper (vmbuild/guest/vmbuild-job), exercised on the host.

Its serial ports are replaced by plain files through the test-only environment overrides, so
these tests see exactly the bytes the runner would read from COM2 and COM3.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from vmbuild.recipe import load_recipe
from vmbuild.runner.contract import JobOutputFilter, parse_control
from vmbuild.stages.playbook import GUEST_LIB, WRAPPER_MODULE, job_config, wrapper_entry

WRAPPER = Path(__file__).resolve().parents[1] / "vmbuild" / "guest" / "vmbuild-job"
# The wrapper takes INVOCATION_ID for "started by systemd in the guest" (then it writes to the
# console and watches the power button): a test run from a systemd unit must not pass it on.
HOST_ENV = {key: value for key, value in os.environ.items() if key != "INVOCATION_ID"}


def run_wrapper(tmp_path: Path, config: dict[str, Any], input_dir: Path | None = None
                ) -> tuple[int, str, list[dict[str, Any]]]:
    job_port, control_port = tmp_path / "job.log", tmp_path / "control.log"
    job_port.write_bytes(b"")
    control_port.write_bytes(b"")
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(config))
    env = dict(HOST_ENV, VMBUILD_JOB_PORT=str(job_port),
               VMBUILD_CONTROL_PORT=str(control_port), VMBUILD_NO_DISKS="1")
    if input_dir is not None:
        env["VMBUILD_INPUT_DIR"] = str(input_dir)
    proc = subprocess.run([sys.executable, str(WRAPPER), str(cfg)], env=env,
                          capture_output=True, timeout=120)
    output = JobOutputFilter().feed(job_port.read_bytes()).decode()
    return proc.returncode, output, parse_control(control_port.read_text()).events


def config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "t", "command": ["/bin/true"], "workdir": "/",
                            "user": "root", "environment": {}, "timeout": None,
                            "network": False, "outputs": None}
    return {**base, **overrides}


@pytest.mark.skipif(os.geteuid() != 0, reason="the wrapper switches users: run as root")
class TestWrapper:
    def test_exit_status_is_reported_on_the_control_port(self, tmp_path: Path) -> None:
        status, output, events = run_wrapper(tmp_path, config(
            command=["/bin/sh", "-c", "echo out; echo err >&2; exit 7"]))
        assert status == 7
        assert output == "out\nerr\n"
        # "boot" (where the boot's time went) follows the start, never delays it.
        assert [e["event"] for e in events] == ["started", "boot", "exited"]
        assert isinstance(events[0]["uptime"], float)
        assert events[-1]["status"] == 7

    def test_argv_environment_and_workdir_arrive_verbatim(self, tmp_path: Path) -> None:
        tricky = "it's \"q\" $HOME %h ; `id` {{ x }}\nline2"
        status, output, _ = run_wrapper(tmp_path, config(
            command=[sys.executable, "-c",
                     "import json,os,sys; print(json.dumps([sys.argv[1:], os.environ['T'], "
                     "os.getcwd()]))", tricky],
            environment={"T": tricky}, workdir=str(tmp_path)))
        assert status == 0
        assert json.loads(output) == [[tricky], tricky, str(tmp_path)]

    def test_timeout_kills_the_job_and_says_so(self, tmp_path: Path) -> None:
        status, _, events = run_wrapper(tmp_path, config(
            command=["/bin/sh", "-c", "echo start; sleep 60"], timeout=1))
        assert status == 124
        assert events[-1]["event"] == "timeout" and events[-1]["status"] == 124

    def test_missing_command_is_a_status_not_a_hang(self, tmp_path: Path) -> None:
        status, _, events = run_wrapper(tmp_path, config(command=["/nonexistent/job"]))
        assert status == 127
        assert events[-1]["event"] == "exited" and events[-1]["status"] == 127

    def test_the_input_disk_can_replace_the_command_for_one_boot(self, tmp_path: Path) -> None:
        """A validation boot's command and environment come from the input disk's spec; the
        image's own job.json is not touched."""
        inputs = tmp_path / "input"
        inputs.mkdir()
        (inputs / "vmbuild-input.json").write_text(json.dumps({
            "args": ["x y"], "environment": {"SMOKE": "1"},
            "command": ["/bin/sh", "-c", 'echo "$0|$1|$SMOKE|$VMBUILD_INPUT"', "cmd"]}))
        status, output, events = run_wrapper(
            tmp_path, config(command=["/bin/false"]), input_dir=inputs)
        assert status == 0
        assert output == f"cmd|x y|1|{inputs}\n"
        assert events[0]["argv"][:2] == ["/bin/sh", "-c"]

    def test_a_spec_without_a_command_runs_the_job_as_built(self, tmp_path: Path) -> None:
        inputs = tmp_path / "input"
        inputs.mkdir()
        (inputs / "vmbuild-input.json").write_text(json.dumps({"command": "not a list"}))
        status, output, _ = run_wrapper(
            tmp_path, config(command=["/bin/sh", "-c", "echo as built"]), input_dir=inputs)
        assert (status, output) == (0, "as built\n")

    def test_a_shutdown_mid_job_is_reported_not_lost(self, tmp_path: Path) -> None:
        """The VM shutting down (SIGTERM to the wrapper, as systemd does at power-off) ends
        the job, and the wrapper still reports how it ended (and returns its outputs)."""
        job_port, control_port = tmp_path / "job.log", tmp_path / "control.log"
        job_port.write_bytes(b"")
        control_port.write_bytes(b"")
        cfg = tmp_path / "job.json"
        cfg.write_text(json.dumps(config(command=["/bin/sh", "-c", "echo up; sleep 60"])))
        env = dict(HOST_ENV, VMBUILD_JOB_PORT=str(job_port),
                   VMBUILD_CONTROL_PORT=str(control_port), VMBUILD_NO_DISKS="1")
        proc = subprocess.Popen([sys.executable, str(WRAPPER), str(cfg)], env=env,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while b"up" not in job_port.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(timeout=60) == 143
        events = parse_control(control_port.read_text()).events
        assert events[-1] == {**events[-1], "event": "exited", "status": 143,
                              "stopped_by": "SIGTERM"}

    def test_the_job_gets_default_signal_dispositions(self, tmp_path: Path) -> None:
        """Python ignores SIGPIPE for itself; the job (started with fork and exec, not
        subprocess) must not inherit that: `yes | head` ends `yes` by SIGPIPE, as in a shell."""
        status, output, _ = run_wrapper(tmp_path, config(
            command=["/bin/sh", "-c", '(yes; echo "yes:$?" >&2) | head -n1']))
        assert status == 0
        assert output.splitlines() == ["y", "yes:141"]

    def test_the_units_entry_runs_the_precompiled_module(self, tmp_path: Path) -> None:
        """The guest runs the wrapper as a module the seal byte-compiles; the entry the unit
        starts imports it and passes on its exit status."""
        lib = tmp_path / "lib"
        lib.mkdir()
        (lib / f"{WRAPPER_MODULE}.py").write_bytes(WRAPPER.read_bytes())
        subprocess.run([sys.executable, "-m", "py_compile", str(lib / f"{WRAPPER_MODULE}.py")],
                       check=True)
        entry = lib / "vmbuild-job"
        entry.write_text(wrapper_entry().replace(repr(GUEST_LIB), repr(str(lib))))
        cfg = tmp_path / "job.json"
        cfg.write_text(json.dumps(config(command=["/bin/sh", "-c", "exit 5"])))
        control_port = tmp_path / "control.log"
        control_port.write_bytes(b"")
        env = dict(HOST_ENV, VMBUILD_JOB_PORT=str(tmp_path / "job.log"),
                   VMBUILD_CONTROL_PORT=str(control_port), VMBUILD_NO_DISKS="1")
        proc = subprocess.run([sys.executable, "-IS", "-X", "importtime", str(entry), str(cfg)],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 5
        assert parse_control(control_port.read_text()).events[-1]["status"] == 5
        # Imported from its bytecode (a compiled module is not compiled again).
        assert (lib / "__pycache__").is_dir()
        assert f"| {WRAPPER_MODULE}\n" in proc.stderr

    def test_unknown_user_is_reported(self, tmp_path: Path) -> None:
        status, _, events = run_wrapper(tmp_path, config(user="no-such-user-here"))
        assert status == 127
        assert events[-1]["event"] == "exited" and events[-1]["status"] == 127
        assert "no-such-user-here" in events[-1]["message"]


def test_job_config_from_a_recipe_is_plain_json(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nname: hi\njob:\n  command: echo $HOME %h\n  timeout: 90s\n"
                      "  environment: {A: 'x;y'}\n")
    cfg = job_config(load_recipe(recipe))
    assert cfg["command"] == ["/bin/sh", "-c", "echo $HOME %h"]
    assert cfg["timeout"] == 90
    assert cfg["environment"] == {"A": "x;y"}
    json.dumps(cfg)


def test_finds_the_job_disks_by_their_superblocks_without_udev(tmp_path: Path) -> None:
    """The wrapper reads the labels from the kernel's block devices itself (no udev settle):
    ext4 labels are found, other filesystems and partition tables are not, removable devices
    are never opened, and with one job disk present the other is not waited for."""
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    sys_block.mkdir()
    dev.mkdir()
    for name, label in (("sdb", "VMBOUTPUT"), ("sdc", "other"), ("nvme1n1", "VMBINPUT")):
        image = dev / name
        image.write_bytes(b"")
        os.truncate(image, 4 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(image)], check=True)
        (sys_block / name).mkdir()
    (dev / "sda").write_bytes(b"\0" * 4096)  # a partition table, not a filesystem
    (sys_block / "sda").mkdir()
    (sys_block / "sr0").mkdir()  # never opened: there is no /dev node for it here either
    script = (
        "import importlib.machinery, json, sys, time\n"
        f"w = importlib.machinery.SourceFileLoader('w', {str(WRAPPER)!r}).load_module()\n"
        "t = time.monotonic()\n"
        "print(json.dumps([w.find_label('VMBINPUT', 5), w.find_label('VMBOUTPUT', 5),\n"
        "                  w.labelled_disks(), time.monotonic() - t]))\n")
    env = dict(HOST_ENV, VMBUILD_SYS_BLOCK=str(sys_block), VMBUILD_DEV_DIR=str(dev))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout
    inp, outp, found, _ = json.loads(out)
    assert (inp, outp) == (str(dev / "nvme1n1"), str(dev / "sdb"))
    assert found == {"VMBINPUT": str(dev / "nvme1n1"), "VMBOUTPUT": str(dev / "sdb")}
    (dev / "nvme1n1").unlink()
    (sys_block / "nvme1n1").rmdir()
    inp, outp, found, took = json.loads(subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True,
        check=True).stdout)
    assert inp is None and outp == str(dev / "sdb")
    assert took < 5  # the output disk is here, so the missing input disk is not waited for


def test_a_missing_job_disk_is_waited_for_only_where_disks_may_still_come(
        tmp_path: Path) -> None:
    """With the root on a SCSI disk every disk is announced before /init, so a missing job disk
    is not waited for; elsewhere (NVMe, here the host's own root) the grace is."""
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    sys_block.mkdir()
    dev.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    major = os.major(root.stat().st_dev)
    script = (
        "import importlib.machinery, json, sys, time\n"
        f"w = importlib.machinery.SourceFileLoader('w', {str(WRAPPER)!r}).load_module()\n"
        "w.SCSI_DISK_MAJORS = frozenset(int(m) for m in sys.argv[1:])\n"
        "t = time.monotonic()\n"
        "print(json.dumps([w.find_label('VMBINPUT', 2), time.monotonic() - t]))\n")
    env = dict(HOST_ENV, VMBUILD_SYS_BLOCK=str(sys_block), VMBUILD_DEV_DIR=str(dev),
               VMBUILD_ROOT_DIR=str(root))

    def took(*majors: int) -> float:
        out = subprocess.run([sys.executable, "-c", script, *map(str, majors)], env=env,
                             capture_output=True, text=True, check=True).stdout
        found, seconds = json.loads(out)
        assert found is None
        return float(seconds)

    assert took(major) < 1  # the root's disk is a SCSI disk: nothing more will come
    assert took(major + 1) >= 2  # it is not: the grace is waited out


def test_a_power_button_press_is_turned_into_a_power_off(tmp_path: Path) -> None:
    """No logind in the image: the wrapper reads the ACPI power button's input events itself
    (found by the device's name, its node from devtmpfs) and acts on a press, not on a release
    or another key."""
    sys_input, dev = tmp_path / "sys", tmp_path / "dev"
    for event, name in (("event0", "AT Translated Set 2 keyboard"), ("event2", "Power Button")):
        (sys_input / event / "device").mkdir(parents=True)
        (sys_input / event / "device" / "name").write_text(name + "\n")
    (dev / "input").mkdir(parents=True)
    os.mkfifo(dev / "input" / "event2")
    script = (
        "import importlib.machinery, sys\n"
        f"w = importlib.machinery.SourceFileLoader('w', {str(WRAPPER)!r}).load_module()\n"
        "print(w.power_buttons(), flush=True)\n"
        "w.wait_for_power_button(lambda: print('pressed', flush=True))\n"
        "print('returned', flush=True)\n")
    env = dict(HOST_ENV, VMBUILD_SYS_INPUT=str(sys_input), VMBUILD_DEV_DIR=str(dev))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            text=True)
    input_event = struct.Struct("llHHi")
    with open(dev / "input" / "event2", "wb") as button:  # blocks until the wrapper reads
        button.write(input_event.pack(0, 0, 1, 114, 1))  # another key (volume down)
        button.write(input_event.pack(0, 0, 1, 116, 0))  # the power key released
        button.write(input_event.pack(0, 0, 0, 0, 0))  # EV_SYN
        button.write(input_event.pack(0, 0, 1, 116, 1))  # the power key pressed
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.splitlines() == [str([str(dev / "input" / "event2")]), "pressed", "returned"]


def _load_wrapper() -> Any:
    loader = importlib.machinery.SourceFileLoader("vmbuild_job_under_test", str(WRAPPER))
    module = types.ModuleType(loader.name)
    loader.exec_module(module)
    return module


HOSTILE_VALUES: list[Any] = [
    "plain", "", "it's \"q\" \\ / \b\f\n\r\t \x00\x1f\x7f", "ünïcödé ✓ 𝄞 \ud800",
    0, -7, 2**70, 1.5, 1795736127.537, 1e-9, True, False, None,
    [], {}, ["a", [1, {"b": None}]],
    {"z": 1, "a": {"y": [True, 2.25]}, "m": "x"},
]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_the_wrappers_json_is_the_json_modules(value: Any) -> None:
    """The wrapper reads and writes JSON with json's C half, without importing json: what it
    writes is what json.dumps(sort_keys=True) writes, and it reads that back."""
    w = _load_wrapper()
    written = w.json_dumps(value)
    assert written == json.dumps(value, sort_keys=True)
    assert w.json_loads(written) == json.loads(written)
    assert w.json_loads(f" \n{json.dumps(value, indent=2)}\n") == json.loads(written)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "NaN", '{"a": Infinity}', "[1,]",
                                  "'single'", '"unterminated'])
def test_the_wrappers_json_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        _load_wrapper().json_loads(text)


def test_the_wrapper_imports_only_c_modules_before_the_job() -> None:
    """Everything before the job's start is on each job's clock: the wrapper's own imports
    are modules written in C (json, subprocess, signal and threading import re, enum,
    selectors and locale: half a second under TCG)."""
    script = (
        "import importlib.machinery, sys, types\n"
        "before = set(sys.modules)\n"
        f"loader = importlib.machinery.SourceFileLoader('w', {str(WRAPPER)!r})\n"
        "before |= set(sys.modules)\n"
        "loader.exec_module(types.ModuleType('w'))\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n")
    added = subprocess.run([sys.executable, "-IS", "-c", script], capture_output=True,
                           text=True, check=True).stdout.split()
    os_module = {"os", "os.path", "posixpath", "genericpath", "stat", "_stat",
                 "_collections_abc"}  # what a start without -S has loaded already
    assert set(added) <= os_module | {"__future__", "_json", "_signal", "_thread", "pwd",
                                      "select", "struct", "_struct", "termios", "time"}, added
