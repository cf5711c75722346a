"""The base stage: a minimal Debian disk built with mmdebstrap, cached by a content hash.

The base holds what changes rarely (release, packages, kernel, disk geometry, bootloader);
everything that names the application (hostname, files, the job) is applied later by the app
stage, so editing the application reuses the cached base. The base has no SSH key in it: the
build injects a fresh key per build through QEMU's fw_cfg (see guest/vmbuild-build-access).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vmbuild.errors import BuildError, UsageError
from vmbuild.events import Event, Reporter, Stage
from vmbuild.recipe import Recipe
from vmbuild.runner.accel import cache_root
from vmbuild.stages import disk as diskimage
from vmbuild.tools import run_tool

# Bump when the base's construction changes in a way the settings below do not capture.
BASE_FORMAT = 3
GUEST_DIR = Path(__file__).parent.parent / "guest"
BASE_GUEST_FILES = ("vmbuild-build-access", "vmbuild-build-access.service",
                    "10-vmbuild-dhcp.network")
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200 net.ifnames=0"

# Packages every image needs: systemd as init, udev for device links, sshd and python3 so the
# build can provision with Ansible, resolved so a networked job has DNS.
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "openssh-server",
                 "python3", "systemd-resolved")

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
                shutil.rmtree(work / "rootfs")
            os.replace(work, final)  # publish: a base dir is complete or absent
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    result = _load_cached(final, key)
    assert result is not None
    return BaseImage(key, result.disk, result.info, cached=False)


def _check_build_host() -> None:
    missing = [tool for tool in ("mmdebstrap", "mkfs.ext4", "sfdisk", "grub-mkimage", "qemu-img",
                                 "mcopy") if shutil.which(tool) is None]
    if missing:
        raise UsageError("missing build tools: " + ", ".join(missing)
                         + " (see the README's set-up: apt-get install ...)")
    if os.geteuid() != 0:
        raise UsageError("building a base image needs root (mmdebstrap writes device nodes "
                         "and file ownership into the guest's root filesystem)")


def _stream(argv: list[str], stage: Stage, what: str) -> None:
    """Run a long tool, passing each line it prints on as a progress step."""
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
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


def _build(settings: BaseSettings, work: Path, stage: Stage) -> dict[str, object]:
    rootfs = work / "rootfs"
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            "--include=" + ",".join(settings.packages),
            "--aptopt=Acquire::Retries=3",
            *[f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES],
            settings.release, str(rootfs), *settings.sources]
    _stream(argv, stage, "mmdebstrap")

    stage.step("configuring the base system")
    layout = diskimage.plan_layout(settings.disk, settings.firmware)
    _configure_rootfs(rootfs, layout)
    diskimage.install_grub_files(rootfs, layout, KERNEL_CMDLINE)
    packages_installed = _dpkg_list(rootfs)

    stage.step("assembling the disk (partitions, ext4, GRUB)")
    raw = work / "base.raw"
    diskimage.assemble_disk(rootfs, raw, layout)
    stage.step("converting the disk to qcow2")
    run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "base.qcow2")],
             "converting the base disk to qcow2")
    raw.unlink()
    return {"settings": settings.to_json(), "root_uuid": layout.root_uuid,
            "packages": packages_installed}


def _configure_rootfs(root: Path, layout: diskimage.DiskLayout) -> None:
    (root / "etc/fstab").write_text(
        f"UUID={layout.root_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("vmbuild\n")
    lib = root / "usr/local/lib/vmbuild"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST_DIR / "vmbuild-build-access", lib / "vmbuild-build-access")
    (lib / "vmbuild-build-access").chmod(0o755)
    shutil.copy2(GUEST_DIR / "vmbuild-build-access.service",
                 root / "etc/systemd/system/vmbuild-build-access.service")
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST_DIR / "10-vmbuild-dhcp.network", netdir / "10-vmbuild-dhcp.network")
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
