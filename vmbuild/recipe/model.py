"""The recipe model (RECIPE.md, version 1): what a loaded, validated recipe is.

Plain frozen dataclasses, with every default applied; `load_recipe()` (loader.py) builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_VERSION = 1


@dataclass(frozen=True)
class FileSpec:
    """One `application.files` entry, with its source resolved inside the recipe directory."""

    src: str  # as written in the recipe
    src_path: Path  # resolved absolute path, guaranteed inside the recipe directory
    contents: bool  # True when src ends with "/": copy the directory's contents, not itself
    dest: str  # absolute guest path
    mode: str | None = None  # octal string such as "0755"
    owner: str | None = None


@dataclass(frozen=True)
class Guest:
    release: str = "bookworm"
    arch: str = "amd64"
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    disk: int = 4 * 1024**3  # bytes
    memory: int = 512 * 1024**2  # bytes
    cpus: int = 1
    firmware: str = "bios"  # bios | efi
    hostname: str = ""  # "" until defaulted to the recipe name
    timezone: str = "UTC"
    ssh: bool = False  # keep sshd enabled in the shipped image (no keys are left in it either way)
    vmware_tools: bool = False  # open-vm-tools in the image; its services start only under VMware
    modules: tuple[str, ...] = ()  # kernel modules kept beyond vmbuild's own list
    init: str = "systemd"  # systemd | job (the job's wrapper is PID 1: no services)


@dataclass(frozen=True)
class Application:
    files: tuple[FileSpec, ...] = ()
    run: tuple[str, ...] = ()
    playbook: Path | None = None  # resolved absolute path inside the recipe directory


@dataclass(frozen=True)
class Job:
    command: tuple[str, ...]  # argv; a string in the recipe becomes ("/bin/sh", "-c", string)
    workdir: str = "/"
    user: str = "root"
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds
    network: bool = False
    outputs: str | None = None  # absolute guest directory returned to the host


@dataclass(frozen=True)
class Output:
    hardware_version: int = 19
    guest_os: str = "debian12-64"
    disk_controller: str = "pvscsi"  # pvscsi | lsilogic | sata | nvme
    nic: str = "vmxnet3"  # vmxnet3 | e1000e | e1000
    vmdk: str = "monolithicSparse"  # monolithicSparse | streamOptimized
    formats: tuple[str, ...] = ("vmx",)


@dataclass(frozen=True)
class Expect:
    """What the validation boot must see for the image to pass."""

    exit: int = 0  # the job's exit status
    output: str | None = None  # regex source (checked to compile); must match a line of job output


@dataclass(frozen=True)
class Validate:
    """The boot test at the end of a build (`validate:`).

    Reaches the guest for the validation boot only, through the input disk: nothing here is
    baked into the shipped image, so it never changes what the image does when run.
    """

    command: tuple[str, ...] | None = None  # argv; None: job.command as written
    inputs: tuple[Path, ...] = ()  # resolved absolute paths inside the recipe directory
    environment: Mapping[str, str] = field(default_factory=dict)  # merged over job.environment
    expect: Expect = Expect()
    until: str = "exit"  # exit: the job must finish | started: it must start and keep running
    running_for: float = 30.0  # seconds; with until: started
    timeout: float = 600.0  # seconds; the boot test fails past this


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe file, absolute
    name: str
    guest: Guest
    application: Application
    job: Job
    output: Output
    version: int = 1
    sources: tuple[Path, ...] = ()  # every file read, extends chain included, for hashing
    validate: Validate = field(default_factory=Validate)  # defaulted: Recipe(...) in tests

    @property
    def directory(self) -> Path:
        return self.path.parent
