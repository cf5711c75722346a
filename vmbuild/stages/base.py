"""The base stage: a minimal Debian disk built with mmdebstrap, cached by a content hash.

The base holds what changes rarely (release, packages, kernel, disk geometry, bootloader);
everything that names the application (hostname, files, the job) is applied later by the app
stage, so editing the application reuses the cached base. The base has no SSH key in it: the
build injects a fresh key per build through QEMU's fw_cfg (see guest/vmbuild-build-access).

Root is not needed. As root, mmdebstrap runs in its `root` mode, as before. Any other user
builds inside a user namespace (`unshare` with `newuidmap`) that maps the guest's ids to
the user's /etc/subuid range, as mmdebstrap's own unshare mode does, and also maps the user
at id 65536, so that namespace's root may write the user's own (even private) cache
directory. mmdebstrap (in `--mode=unshare`, which as that root only adds mount and pid
namespaces), the configuration of the tree, its `chroot` calls, `mkfs.ext4 -d` and the
tree's removal all run in that mapping, where the tree's files show their guest owners: mkfs
records uid 0, not the host's 100000. Device nodes, which only real root can make, are
written into the filesystem by the disk stage (`disk.complete_dev`). mmdebstrap's own
`--unshare-helper` is not used because its mapping leaves the user out, so its root could
not enter a home directory of mode 0700. As root the same worker runs without a namespace,
and mmdebstrap keeps `--mode=root`, which makes real device nodes: the route root has always
taken. tests/test_rootless.py builds both ways and compares the disks entry by entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vmbuild.errors import BuildError, UsageError
from vmbuild.events import Event, Reporter, Stage
from vmbuild.recipe import Recipe
from vmbuild.runner.accel import cache_root
from vmbuild.stages import disk as diskimage
from vmbuild.tools import find_tool, missing_tools, run_tool, tool_env

# Bump when the base's construction changes in a way the settings below do not capture.
BASE_FORMAT = 8
GUEST_DIR = Path(__file__).parent.parent / "guest"
BASE_GUEST_FILES = ("vmbuild-build-access", "vmbuild-build-access.service",
                    "10-vmbuild-dhcp.network")
# `quiet`: under TCG every console byte is an emulated UART write at 115200 baud, and the
# kernel's and systemd's boot messages were a few seconds of them (a panic still prints).
# `fsck.mode=skip`: a job VM boots a freshly sealed disk from a throwaway layer, so neither
# the initramfs nor systemd needs to check it. Not `init_on_free=1`: zeroing what the guest
# frees kept a checkpoint free of stale pages (30 MiB instead of 44 for the counting job at
# 512 MiB, both under the 64 MiB goal), but it zeroes all of the guest's memory at boot, about
# a second of every job start under TCG.
# `i8042.noaux`: no PS/2 mouse port, so no mouse driver probing it (a second under TCG).
KERNEL_CMDLINE = ("console=tty0 console=ttyS0,115200 net.ifnames=0 quiet fsck.mode=skip "
                  "i8042.noaux")

# Packages every image needs: systemd as init, udev for device links, sshd and python3 so the
# build can provision with Ansible, resolved so a networked job has DNS, zstd so the
# initramfs is zstd-compressed (faster to unpack than gzip, and smaller), a static busybox
# for the shipped image's own initramfs (vmbuild/guest/vmbuild-initramfs, written by the seal;
# initramfs-tools' one boots the build VM).
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "openssh-server",
                 "python3", "systemd-resolved", "zstd", "busybox-static")

# The initramfs carries the drivers of the virtual disk controllers a .vmx can declare (and
# QEMU's stand-ins for them: lsilogic boots as lsi53c895a there, hence sym53c8xx; the build
# VM itself boots from virtio-scsi, see stages/packer.py) instead of
# initramfs-tools' default "most" (every storage driver: 15 MiB of initrd, seconds to unpack
# and probe under TCG). Modules built into a kernel are skipped by mkinitramfs. They are added
# by a hook, not listed in modules.d: a listed module is loaded at every boot whether or not its
# device is there (each one's probe was a fraction of a second under TCG); added, it is loaded
# by the initramfs' udev only for the controller the VM has.
INITRAMFS_CONF = "MODULES=list\nCOMPRESS=zstd\n"
INITRAMFS_HOOK = "/etc/initramfs-tools/hooks/vmbuild"
INITRAMFS_MODULES = ("vmw_pvscsi", "mptspi", "mptsas", "sym53c8xx", "ahci", "nvme",
                     "virtio_pci", "virtio_scsi", "sd_mod", "ext4")
# Debian's merged /usr made by mmdebstrap's own hook, as debootstrap does: otherwise apt
# satisfies init-system-helpers' "usrmerge | usr-is-merged" with usrmerge, which pulls in the
# full perl (51 MiB of the image) only to convert a tree that could be born merged.
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# Documentation, man pages and translations are a sixth of a minimal system and are never
# read inside a batch job; copyright files stay, as Debian's licences ask.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)


@dataclass(frozen=True)
class BaseImage:
    """A cached base disk and what went into it."""

    key: str
    disk: Path  # qcow2
    info: dict[str, object]
    cached: bool  # True when reused rather than built by this call


def kernel_package(recipe: Recipe) -> str:
    """The cloud kernel is a third of the size but lacks the LSI, AHCI and Intel NIC drivers."""
    needs_generic = recipe.output.disk_controller in ("lsilogic", "sata") or (
        recipe.job.network and recipe.output.nic in ("e1000", "e1000e"))
    return "linux-image-amd64" if needs_generic else "linux-image-cloud-amd64"


# Releases whose -updates and -security suites exist: a job image gets their fixes too.
SUPPORTED_WITH_UPDATES = ("bullseye", "bookworm", "trixie")


def _host_apt_uris() -> list[str]:
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            if line.lower().startswith("uris:"):
                candidates.extend(line.split(":", 1)[1].split())
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uri = next((p for p in parts[1:] if not p.startswith("[")), "")
                candidates.append(uri)
    return candidates


def host_mirror() -> str:
    """The Debian mirror the build host's apt uses (RECIPE.md's default for guest.mirror)."""
    for uri in _host_apt_uris():
        if uri.startswith(("http://", "https://")) and "security" not in uri \
                and uri.rstrip("/").endswith("/debian"):
            return uri
    return "http://deb.debian.org/debian"


def host_security_mirror() -> str:
    for uri in _host_apt_uris():
        if uri.startswith(("http://", "https://")) and uri.rstrip("/").endswith("-security"):
            return uri
    return "http://deb.debian.org/debian-security"


def apt_sources(release: str, mirror: str) -> list[str]:
    """One-line sources for mmdebstrap: the release, plus its updates and security fixes."""
    sources = [f"deb {mirror} {release} main"]
    if release in SUPPORTED_WITH_UPDATES:
        sources.append(f"deb {mirror} {release}-updates main")
        sources.append(f"deb {host_security_mirror()} {release}-security main")
    return sources


@dataclass(frozen=True)
class BaseSettings:
    """Everything that shapes the base disk, and nothing else: this is what the cache key hashes."""

    release: str
    arch: str
    sources: tuple[str, ...]
    packages: tuple[str, ...]
    disk: int
    firmware: str
    cmdline: str
    guest_files: tuple[tuple[str, str], ...]  # (name, sha256) of files baked into the base
    diskimage: str  # sha256 of the disk assembly code
    initramfs_conf: str
    initramfs_modules: tuple[str, ...]
    format: int = BASE_FORMAT

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def key(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def base_settings(recipe: Recipe) -> BaseSettings:
    g = recipe.guest
    return BaseSettings(
        release=g.release,
        arch=g.arch,
        sources=tuple(apt_sources(g.release, g.mirror or host_mirror())),
        packages=tuple(sorted({*BASE_PACKAGES, kernel_package(recipe), *g.packages})),
        disk=g.disk,
        firmware=g.firmware,
        cmdline=KERNEL_CMDLINE,
        initramfs_conf=INITRAMFS_CONF,
        initramfs_modules=INITRAMFS_MODULES,
        guest_files=tuple((name, hashlib.sha256((GUEST_DIR / name).read_bytes()).hexdigest())
                          for name in BASE_GUEST_FILES),
        diskimage=hashlib.sha256(Path(diskimage.__file__).read_bytes()).hexdigest(),
    )


def base_key(recipe: Recipe) -> str:
    return base_settings(recipe).key


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds of the same base: the second waits, then finds it cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_cached(directory: Path, key: str) -> BaseImage | None:
    disk, info = directory / "base.qcow2", directory / "base.json"
    if disk.is_file() and info.is_file():
        return BaseImage(key, disk, json.loads(info.read_text()), cached=True)
    return None


def ensure_base(recipe: Recipe, report: Reporter, *, cache: Path | None = None,
                refresh: bool = False) -> BaseImage:
    """Return the base disk for this recipe, building it only when no cached copy matches."""
    settings = base_settings(recipe)
    key = settings.key
    root = (cache or cache_root()) / "base"
    final = root / key
    with _locked(root / f"{key}.lock"):
        if refresh and final.exists():
            shutil.rmtree(final)
        found = _load_cached(final, key)
        if found is not None:
            report(Event("base", "cached", f"reusing cached base image {key}",
                         {"key": key, "path": str(found.disk)}))
            return found
        _check_build_host()
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            with Stage(report, "base", f"building base image {key} (mmdebstrap)") as stage:
                info = _build(settings, work, stage)
            (work / "base.json").write_text(json.dumps(info, indent=2, sort_keys=True))
            if (work / "rootfs").exists():
                _discard(work / "rootfs")
            os.replace(work, final)  # publish: a base dir is complete or absent
        finally:
            if work.exists():
                _discard(work)
    result = _load_cached(final, key)
    assert result is not None
    return BaseImage(key, result.disk, result.info, cached=False)


def rootless() -> bool:
    """True when this process is not root: the base is then built in a user namespace."""
    return os.geteuid() != 0


# Guest ids mapped into the build namespace: the first 65536 ids of the user's range, as
# mmdebstrap maps them. (util-linux 2.38 leaves the top one, 65535, unmapped when the user is
# mapped beside the range; Debian never assigns 65535, policy 9.2.2.) The user sits above.
GUEST_IDS = 65536


def subordinate_range(path: Path, user: str, uid: int) -> tuple[int, int] | None:
    """The first (start, count) that /etc/subuid or /etc/subgid (`path`) gives this user."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) \
                and fields[1].isdigit() and fields[2].isdigit():
            return int(fields[1]), int(fields[2])
    return None


def _id_ranges() -> tuple[tuple[int, int], tuple[int, int]]:
    """The user's subordinate uid and gid ranges, or a UsageError that says how to add them."""
    uid = os.geteuid()
    user = pwd.getpwuid(uid).pw_name
    found = []
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        rng = subordinate_range(path, user, uid)
        if rng is None or rng[1] < GUEST_IDS:
            raise UsageError(
                f"building a base image without root needs {GUEST_IDS} subordinate ids for "
                f"{user} in {path} (useradd adds them; otherwise, as root: usermod "
                f"--add-subuids 100000-165535 --add-subgids 100000-165535 {user})")
        found.append(rng)
    return found[0], found[1]


def _check_build_host() -> None:
    missing = missing_tools(["mmdebstrap", "mkfs.ext4", "debugfs", "sfdisk", "grub-mkimage",
                             "qemu-img", "mcopy",
                             *(["unshare", "newuidmap", "newgidmap"] if rootless() else [])])
    if missing:
        raise UsageError("missing build tools: " + ", ".join(missing)
                         + " (see the README's set-up: apt-get install ...)")
    if rootless():
        _id_ranges()


def as_guest_root(argv: list[str]) -> list[str]:
    """`argv` run as root of the guest's ids: directly when root, otherwise in the mapping
    described in the module docstring. The result is an argument list, for no shell."""
    if not rootless():
        return argv
    (uid0, _), (gid0, _) = _id_ranges()
    return [find_tool("unshare") or "unshare", "--user",
            f"--map-users={uid0},0,{GUEST_IDS}", f"--map-groups={gid0},0,{GUEST_IDS}",
            f"--map-user={GUEST_IDS}", f"--map-group={GUEST_IDS}",
            "--setuid=0", "--setgid=0", "--", *argv]


def _discard(path: Path) -> None:
    """Remove a work tree. Without root a rootfs holds files of subordinate uids that the user
    cannot unlink directly, so the removal runs in the mapping."""
    if rootless() and path.exists():
        with contextlib.suppress(BuildError):
            run_tool(as_guest_root(["rm", "-rf", "--one-file-system", "--", str(path)]),
                     f"removing {path}")
    shutil.rmtree(path, ignore_errors=True)


def _stream(argv: list[str], stage: Stage, what: str) -> None:
    """Run a long tool, passing each line it prints on as a progress step."""
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=tool_env(), umask=0o022) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail = [*tail[-19:], line]
            if line.startswith(("I:", "E:", "W:")):
                stage.step(line[2:].strip())
        status = proc.wait()
    if status != 0:
        raise BuildError(f"{what} failed with exit status {status}:\n  " + "\n  ".join(tail))


def initramfs_hook_script(modules: tuple[str, ...]) -> str:
    """An initramfs-tools hook that puts the drivers in the initramfs without loading them
    (`manual_add_modules` skips, quietly, a module the kernel lacks or has built in)."""
    names = " ".join(shlex.quote(m) for m in modules)
    return ("#!/bin/sh\n# vmbuild: the virtual disk controllers' drivers (stages/base.py)\n"
            'PREREQ=""\nprereqs() { echo "$PREREQ"; }\n'
            'case "$1" in prereqs) prereqs; exit 0 ;; esac\n'
            ". /usr/share/initramfs-tools/hook-functions\n"
            f"manual_add_modules {names}\n")


def _build(settings: BaseSettings, work: Path, stage: Stage) -> dict[str, object]:
    rootfs = work / "rootfs"
    mode = "unshare" if rootless() else "root"
    initramfs_conf, initramfs_hook = work / "initramfs.conf", work / "initramfs.hook"
    initramfs_conf.write_text(settings.initramfs_conf)
    initramfs_hook.write_text(initramfs_hook_script(settings.initramfs_modules))
    argv = ["mmdebstrap", "--variant=minbase", f"--mode={mode}", "--format=directory",
            "--include=" + ",".join(settings.packages),
            "--aptopt=Acquire::Retries=3",
            *[f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES],
            *([f"--hook-dir={MERGED_USR_HOOKS}"] if MERGED_USR_HOOKS.is_dir() else []),
            # Before the kernel is installed, so its initramfs is built this way from the start.
            '--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d" '
            '"$1/etc/initramfs-tools/hooks"',
            f"--essential-hook=upload {initramfs_conf} /etc/initramfs-tools/conf.d/vmbuild.conf",
            f"--essential-hook=upload {initramfs_hook} {INITRAMFS_HOOK}",
            f'--essential-hook=chmod 0755 "$1{INITRAMFS_HOOK}"',
            settings.release, str(rootfs), *settings.sources]
    _stream(as_guest_root(argv), stage, f"mmdebstrap (--mode={mode})")

    layout = diskimage.plan_layout(settings.disk, settings.firmware)
    spec = work / "finish.json"
    packages = work / "packages.json"
    raw = work / "base.raw"
    for made in (raw, packages):  # made here, so they belong to the user, not a subuid
        made.touch()
    spec.write_text(json.dumps({"rootfs": str(rootfs), "disk": str(raw),
                                "packages": str(packages), "cmdline": settings.cmdline,
                                "layout": asdict(layout)}))
    worker = [sys.executable, "-m", "vmbuild.stages.base", str(spec)]
    _stream(as_guest_root(worker), stage, "finishing the base disk")

    stage.step("converting the disk to qcow2")
    run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "base.qcow2")],
             "converting the base disk to qcow2")
    raw.unlink()
    initramfs_conf.unlink()
    initramfs_hook.unlink()
    packages_installed: dict[str, str] = json.loads(packages.read_text())
    spec.unlink()
    packages.unlink()
    return {"settings": settings.to_json(), "root_uuid": layout.root_uuid,
            "packages": packages_installed, "built_by": "unshare" if rootless() else "root"}


def finish_tree(rootfs: Path, disk: Path, layout: diskimage.DiskLayout,
                cmdline: str) -> dict[str, str]:
    """Configure the tree, write it to the raw disk and remove it; return its package list.

    Runs where the tree's files show their guest owners (see the module docstring), so it
    prints progress as mmdebstrap does ("I: ...") for `_stream` to pass on.
    """
    print("I: configuring the base system", flush=True)
    _configure_rootfs(rootfs, layout)
    diskimage.install_grub_files(rootfs, layout, cmdline)
    packages = _dpkg_list(rootfs)
    print("I: assembling the disk (partitions, ext4, GRUB)", flush=True)
    diskimage.assemble_disk(rootfs, disk, layout)
    shutil.rmtree(rootfs)
    return packages


def _worker(spec_path: str) -> int:
    os.umask(0o022)  # what the worker writes into the guest must not depend on the caller's
    spec = json.loads(Path(spec_path).read_text())
    try:
        packages = finish_tree(Path(spec["rootfs"]), Path(spec["disk"]),
                               diskimage.DiskLayout(**spec["layout"]), spec["cmdline"])
    except (BuildError, OSError) as exc:
        print(f"E: {exc}", flush=True)
        return 1
    Path(spec["packages"]).write_text(json.dumps(packages))
    return 0


def _install(src: Path, dest: Path, mode: int) -> None:
    """Copy a file into the guest with a fixed mode: a copy that kept the source's mode would
    make the base depend on the checkout's umask (git archive gives 0664, pip 0644)."""
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _configure_rootfs(root: Path, layout: diskimage.DiskLayout) -> None:
    (root / "etc/fstab").write_text(
        f"UUID={layout.root_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("vmbuild\n")
    lib = root / "usr/local/lib/vmbuild"
    lib.mkdir(parents=True, exist_ok=True)
    _install(GUEST_DIR / "vmbuild-build-access", lib / "vmbuild-build-access", 0o755)
    _install(GUEST_DIR / "vmbuild-build-access.service",
             root / "etc/systemd/system/vmbuild-build-access.service", 0o644)
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    _install(GUEST_DIR / "10-vmbuild-dhcp.network", netdir / "10-vmbuild-dhcp.network", 0o644)
    # Host keys made by openssh-server's postinst would be shared by every image built from
    # this base; the build makes its own, and the shipped image has none.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    enable = ["chroot", str(root), "systemctl", "enable", "systemd-networkd",
              "systemd-resolved", "vmbuild-build-access.service"]
    run_tool(enable, "enabling base services")


def _dpkg_list(root: Path) -> dict[str, str]:
    stdout = run_tool(["chroot", str(root), "dpkg-query", "-W", "-f",
                       "${Package}\t${Version}\n"], "listing the base's packages")
    pairs = (line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)
    return dict(sorted((name, version) for name, version in pairs))


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
