#!/usr/bin/env python3
"""Benchmark how fast a published image reaches its job and powers off, with plain QEMU.

No vmbuild code is on the measured path: the image's `.vmdk` is booted by a QEMU command
line written out here (TCG, the `.vmx`'s memory, CPUs and disk controller, the guest
contract's three serial ports as files), the way a site without vmbuild would boot it. For
each run it records

- start → job output: QEMU started until the first byte after the wrapper's
  "job output follows" marker on COM2;
- job exit → powered off: the wrapper's `exited` event on COM3 until QEMU's process ends;
- where the time went until the job started: firmware and boot loader (the host's clock
  minus the guest's uptime at the wrapper's `started` event), then the kernel, the initramfs
  and the init (systemd or vmbuild-init) with the wrapper, read from the wrapper's events
  with the same code that records them in a validation boot's manifest
  (`vmbuild.stages.validate.boot_phases`), and the job's own start (the wrapper's `started`
  event until the job's first output byte).

With `--baseline OTHER.vmx` the same figures are measured for a second image in the same
invocation (runs interleaved, so a noisy machine hurts both alike) and each median is printed
with its ratio to the baseline's:

    .venv/bin/python bench/boot.py --image out/hello/hello.vmx --baseline old/hello.vmx --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Only the figures are read with vmbuild's code; the boot itself is plain QEMU.
from vmbuild.runner.contract import parse_control  # noqa: E402
from vmbuild.stages.validate import boot_phases  # noqa: E402

MARKER = b"=== vmbuild: job output follows ===\n"
SCSI_MODELS = {"pvscsi": "pvscsi", "lsilogic": "lsi53c895a", "lsisas1068": "mptsas1068"}


@dataclass
class Boot:
    to_output: float
    to_poweroff: float
    phases: dict[str, float] = field(default_factory=dict)


def vmx_settings(vmx: Path) -> dict[str, str]:
    settings = {}
    for line in vmx.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip().lower()] = value.strip().strip('"')
    return settings


def qemu_command(vmx: Path, ports: list[Path]) -> list[str]:
    """A plain QEMU command line for the image: what the .vmx declares, nothing of vmbuild."""
    s = vmx_settings(vmx)
    disk_key = next(k[:-len(".filename")] for k in s
                    if k.endswith(":0.filename") and s[k].endswith(".vmdk"))
    controller = disk_key.split(":")[0]
    disk = str(vmx.parent / s[disk_key + ".filename"])
    drive = f"if=none,id=root,file={disk},format=vmdk,snapshot=on"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35" if controller.startswith(
        ("sata", "nvme")) else "pc", "-m", s.get("memsize", "512"), "-smp",
        s.get("numvcpus", "1"), "-nodefaults", "-display", "none", "-no-reboot",
        "-drive", drive]
    if controller.startswith("scsi"):
        model = SCSI_MODELS[s.get(controller + ".virtualdev", "lsilogic")]
        argv += ["-device", f"{model},id=hba", "-device", "scsi-hd,drive=root,bus=hba.0"]
    elif controller.startswith("sata"):
        argv += ["-device", "ide-hd,drive=root,bus=ide.0"]
    else:
        argv += ["-device", "nvme,drive=root,serial=root"]
    if s.get("firmware") == "efi":
        argv += ["-bios", "/usr/share/ovmf/OVMF.fd"]
    for port in ports:
        argv += ["-serial", f"file:{port}"]
    return argv


def where_the_time_went(control: bytes, host_started: float) -> dict[str, float]:
    """Firmware + boot loader (the host's clock at the `started` event minus the guest's
    uptime then), then the guest's own phases as the validation boot records them."""
    phases = boot_phases(parse_control(control.decode(errors="replace")).events)
    if not phases:
        return {}
    return {"firmware+loader": max(0.0, host_started - phases.pop("to_job")), **phases}


def boot_once(vmx: Path, timeout: float) -> Boot:
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        ports = [Path(tmp) / f"ttyS{n}" for n in range(3)]
        for port in ports:
            port.touch()
        t0 = time.monotonic()
        proc = subprocess.Popen(qemu_command(vmx, ports), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first_output = exited_at = started_at = None
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > timeout:
                    raise SystemExit(f"{vmx}: no power-off within {timeout:.0f} s")
                if first_output is None:
                    job = ports[1].read_bytes()
                    if MARKER in job and job.split(MARKER, 1)[1]:
                        first_output = now
                control = ports[2].read_bytes()
                if started_at is None and b'"event": "started"' in control:
                    started_at = now
                if exited_at is None and b'"event": "exited"' in control:
                    exited_at = now
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        end = time.monotonic()
        if first_output is None or exited_at is None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SystemExit(f"{vmx}: the job did not run to its exit event\n{err}\n"
                             + ports[0].read_text(errors="replace")[-2000:])
        phases = where_the_time_went(ports[2].read_bytes(), (started_at or end) - t0)
        if phases and started_at is not None:
            phases["job_own_start"] = max(0.0, first_output - started_at)
        return Boot(first_output - t0, end - exited_at, phases)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, type=Path, help="the image's .vmx")
    parser.add_argument("--baseline", type=Path, help="a second image measured alongside")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    images = {"image": args.image, **({"baseline": args.baseline} if args.baseline else {})}
    boots: dict[str, list[Boot]] = {name: [] for name in images}
    print("plain QEMU (TCG): " + " ".join(qemu_command(args.image, [Path("COM1"), Path("COM2"),
                                                                     Path("COM3")])),
          file=sys.stderr)
    for run in range(args.runs):
        for name, vmx in images.items():
            boot = boot_once(vmx, args.timeout)
            boots[name].append(boot)
            where = ", ".join(f"{k} {v:.2f}" for k, v in boot.phases.items())
            print(f"run {run + 1} {name}: job output after {boot.to_output:.2f} s, powered off "
                  f"{boot.to_poweroff:.2f} s after the job ({where or 'no boot phases'})",
                  file=sys.stderr)
    figures = {}
    for name in images:
        phases = sorted({p for b in boots[name] for p in b.phases})
        figures[name] = {
            "start_to_output_s": median([b.to_output for b in boots[name]]),
            "exit_to_poweroff_s": median([b.to_poweroff for b in boots[name]]),
            **{f"{p}_s": median([b.phases[p] for b in boots[name] if p in b.phases])
               for p in phases},
        }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    against = "; ratio to the baseline" if args.baseline else ""
    print(f"median of {args.runs} runs (TCG, plain QEMU){against}:")
    for key, value in figures["image"].items():
        base = figures.get("baseline", {}).get(key)
        ratio = f"  baseline {base:.2f} s  ({value / base:.2f}x)" if base else ""
        print(f"  {key:<22} {value:6.2f} s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
