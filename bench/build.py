#!/usr/bin/env python3
"""Benchmark the build of the hello example: cold (no cached base) and warm (cached base).

Prints the median of several runs of each, and their ratio to a baseline measured in the same
invocation: a bare `mmdebstrap --variant=minbase` of the same packages, the floor under any
Debian image build. Also prints the image sizes: virtual, allocated (data actually written),
the monolithicSparse VMDK vmbuild ships by default, and a streamOptimized conversion.

    .venv/bin/python bench/build.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "hello" / "recipe.yaml"
BASE_PACKAGES = "systemd-sysv,udev,kmod,initramfs-tools,openssh-server,python3," \
                "systemd-resolved,zstd,busybox-static,linux-image-cloud-amd64"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def build(out: Path, cache: Path) -> float:
    env = dict(os.environ, VMBUILD_CACHE=str(cache))
    return timed([sys.executable, "-m", "vmbuild.cli", str(RECIPE), "-o", str(out)], env)


def baseline(work: Path) -> float:
    target = work / "rootfs"
    try:
        return timed(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
                      f"--include={BASE_PACKAGES}", "bookworm", str(target)])
    finally:
        shutil.rmtree(target, ignore_errors=True)


def sizes(vmdk: Path, work: Path) -> dict[str, int]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)],
                                     capture_output=True, text=True, check=True).stdout)
    raw = work / "sizes.raw"
    stream = work / "sizes-stream.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vmdk), str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(vmdk), str(stream)], check=True)
    result = {"virtual": int(info["virtual-size"]), "allocated": raw.stat().st_blocks * 512,
              "vmdk_monolithicSparse": vmdk.stat().st_size,
              "vmdk_streamOptimized": stream.stat().st_size}
    raw.unlink()
    stream.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--warm-only", action="store_true",
                        help="build the base once (not timed), then time only warm builds "
                        "(issue 9's figure: only the application changed) and the baseline")
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    base: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vmbuild-bench-") as tmp:
        work = Path(tmp)
        shared = work / "cache-shared"
        if args.warm_only:
            build(work / "cold-untimed", shared)
        for run in range(args.runs):
            base.append(baseline(work))
            cache = shared if args.warm_only else work / f"cache-{run}"
            if not args.warm_only:
                cold.append(build(work / f"cold-{run}", cache))
            warm.append(build(work / f"warm-{run}", cache))
            print(f"run {run + 1}: baseline {base[-1]:.1f}s  "
                  + (f"cold {cold[-1]:.1f}s  " if cold else "")
                  + f"warm {warm[-1]:.1f}s", flush=True)
            if not args.warm_only:
                shutil.rmtree(cache, ignore_errors=True)
        image_sizes = sizes(work / "warm-0" / "hello.vmdk", work)
    b = statistics.median(base)
    w = statistics.median(warm)
    print(f"\nhello example, median of {args.runs} runs (validation boot included):")
    print(f"  baseline (bare mmdebstrap)  {b:7.1f} s   1.00x")
    if cold:
        c = statistics.median(cold)
        print(f"  cold build (no cached base) {c:7.1f} s   {c / b:.2f}x baseline")
        print(f"  warm build (cached base)    {w:7.1f} s   {w / b:.2f}x baseline, "
              f"{w / c:.2f}x cold")
    else:
        print(f"  warm build (cached base)    {w:7.1f} s   {w / b:.2f}x baseline")
    print("image sizes:")
    for name, value in image_sizes.items():
        print(f"  {name:24s} {value / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
