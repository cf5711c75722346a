"""The table: every key a recipe may say, listed once in `SETTINGS` (mkosi style).

Each row names the section and key, the parser that checks and converts the value, the
default, a description and the JSON-Schema fragment. `_parse_section` checks a mapping
against its rows, so parsing, defaults, the schema and the docs cannot drift apart.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmbuild.recipe.model import FileSpec
from vmbuild.recipe.paths import _ABS, _INPUTS, _parse_playbook, _parse_src, _Src
from vmbuild.recipe.units import _DURATION, _size
from vmbuild.recipe.values import (
    _ANY_STRING,
    _BOOL,
    _ENV_NAME_PATTERN,
    _EXTENDS,
    _FORMAT,
    _GUEST_OS_PATTERN,
    _HOSTNAME_PATTERN,
    _MODE_PATTERN,
    _MODULE_PATTERN,
    _NAME_PATTERN,
    _OWNER_PATTERN,
    _PACKAGE_PATTERN,
    _REGEX,
    _SUITE_PATTERN,
    _TIMEZONE_PATTERN,
    _URL_PATTERN,
    _USER_PATTERN,
    _check_url,
    _enum,
    _int,
    _list_of,
    _parse_command,
    _parse_environment,
    _parse_mode,
    _parse_version,
    _regex_type,
    _Type,
)
from vmbuild.recipe.yamlnodes import _fail, _join, _kind, _Loc, _Node


@dataclass(frozen=True)
class Setting:
    """One recipe key. `SETTINGS` is the single source for parsing, defaults, schema and docs."""

    section: str  # "" (top level), "guest", ..., or "application.files[]" (one files entry)
    key: str
    type: _Type
    description: str
    default: Any = None  # as a user would write it ("4GiB"); parsed like a written value
    required: bool = False
    default_doc: str | None = None  # for a default computed from other settings
    replace: bool = False  # a list the extending recipe replaces instead of appending to
    # the value as a user would write it in YAML (flow style), shown in docs/recipe.md and
    # parsed by the tests; sections have none (their keys' examples make up theirs)
    example: str | None = None

    @property
    def path(self) -> str:
        return _join(self.section, self.key)

    @property
    def nullable(self) -> bool:
        """Optional keys without a default may be written as null, e.g. to unset a base's."""
        return self.default is None and not self.required and self.type.name != "section"


def _section(name: str) -> _Type:
    def parse(node: _Node, field_: str) -> dict[str, Any]:
        return _parse_section(name, node, field_, node.loc)

    return _Type("section", parse, {"$section": name})


def _build_file(values: Mapping[str, Any]) -> FileSpec:
    src: _Src = values["src"]
    return FileSpec(src=src.written, src_path=src.path, contents=src.contents,
                    dest=values["dest"], mode=values["mode"], owner=values["owner"])


_COMMAND = _Type("argv list or string", _parse_command, {
    "oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
              {"type": "string", "minLength": 1}]})
_ENVIRONMENT = _Type("mapping", _parse_environment, {
    "type": "object", "propertyNames": {"pattern": _ENV_NAME_PATTERN},
    "additionalProperties": {"type": ["string", "number"]}})


def _file_entries() -> _Type:
    def parse(node: _Node, field_: str) -> FileSpec:
        return _build_file(_parse_section("application.files[]", node, field_, node.loc))

    item = _Type("file entry", parse, {"$section": "application.files[]"})
    return _list_of(item, name="list of {src, dest, mode, owner}")


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S("", "version", _Type("integer", _parse_version, {"type": "integer", "const": 1}),
       "Recipe format version. Must be 1; other values are refused.", required=True,
       example="1"),
    _S("", "name", _regex_type("name", _NAME_PATTERN, "a valid name: use 1 to 63 lowercase "
                               "letters, digits and -, starting with a letter or digit"),
       "Names the image and its artifact files.", required=True, example="hello"),
    _S("", "extends", _EXTENDS,
       "A base recipe: a bare name (e.g. debian-12-minimal) is a recipe shipped in recipes/; "
       "anything containing / or ending in .yaml is a path relative to this file's directory. "
       "Mappings merge recursively, lists append (base first; job.command and "
       "validate.command are replaced), scalars from the extending recipe win. Relative paths "
       "in a base are relative to the base's own directory.", example="debian-12-minimal"),
    _S("", "guest", _section("guest"),
       "The minimal Debian machine: release, packages, virtual hardware and identity. The "
       "release, mirror, packages, disk size and firmware (with output.disk_controller, which "
       "picks the kernel) shape the cached base image; changing them builds a new one.",
       default={}),
    _S("", "application", _section("application"),
       "What is put into the image at build time: files and directories from the recipe's "
       "directory, shell steps and an optional Ansible playbook, applied in that order.",
       default={}),
    _S("", "job", _section("job"),
       "The service that runs once at boot, then powers the VM off. Its stdout and stderr "
       "go to the second serial port; its exit status is reported on the third.",
       required=True),
    _S("", "output", _section("output"),
       "The VMware artifact: the .vmx settings and the VMDK format.", default={}),
    _S("", "validate", _section("validate"),
       "The boot test at the end of a build (and of `vmbuild validate`). It boots the image on "
       "a throwaway layer; these settings reach the guest for that boot only, through the "
       "input disk, and are never baked into the shipped image, so the image run without "
       "inputs behaves exactly as its `job:` section says.", default={}),

    _S("guest", "release", _regex_type("Debian suite", _SUITE_PATTERN, "a Debian suite name"),
       "Debian suite.", default="bookworm", example="bookworm"),
    _S("guest", "arch", _enum(("amd64",), {
        a: "only amd64 is supported in recipe version 1" for a in
        ("arm64", "aarch64", "i386", "x86_64", "armhf", "armel", "ppc64el", "s390x", "riscv64")
    }), "Guest architecture; amd64 only in version 1.", default="amd64", example="amd64"),
    _S("guest", "mirror", _regex_type("URL", _URL_PATTERN, "an http:// or https:// URL",
                                      _check_url),
       "Debian mirror (http or https).",
       default_doc="the Debian mirror the build host's apt uses",
       example="http://deb.debian.org/debian"),
    _S("guest", "packages",
       _list_of(_regex_type("package name", _PACKAGE_PATTERN, "a Debian package name"),
                unique=True),
       "Extra Debian packages installed in the image (repeats are dropped).", default=[],
       example="[python3, python3-numpy]"),
    _S("guest", "disk", _size(1024**3),
       "Virtual disk size: 512MiB, 4GiB, 2G or bytes. KiB/MiB/GiB/TiB and K/M/G/T are powers "
       "of 1024, KB/MB/GB/TB powers of 1000. At least 1GiB.", default="4GiB", example="8GiB"),
    _S("guest", "memory", _size(128 * 1024**2),
       "Guest memory, same units as disk. At least 128MiB.", default="512MiB",
       example="1GiB"),
    _S("guest", "cpus", _int(1, 64), "Virtual CPUs.", default=1, example="2"),
    _S("guest", "firmware", _enum(("bios", "efi")),
       "Boot firmware: bios (GRUB in the MBR) or efi (GRUB on an EFI system partition). "
       "output.disk_controller: nvme needs efi.", default="bios", example="efi"),
    _S("guest", "hostname", _regex_type("hostname", _HOSTNAME_PATTERN, "a valid host name "
                                        "label (letters, digits, -; at most 63)"),
       "Guest host name.", default_doc="the recipe name", example="hello-vm"),
    _S("guest", "timezone", _regex_type("timezone", _TIMEZONE_PATTERN,
                                        "a time zone name such as UTC or Europe/Berlin"),
       "Guest time zone (a tz database name).", default="UTC", example="Europe/Berlin"),
    _S("guest", "ssh", _BOOL,
       "true: keep sshd installed and enabled in the shipped image. No keys or passwords are "
       "left in the image either way.", default=False, example="true"),
    _S("guest", "vmware_tools", _BOOL,
       "true: open-vm-tools in the image, for time sync after a resume, the guest's IP "
       "address and soft power operations under VMware. Its services start only under "
       "VMware, so a QEMU validation boot is unaffected.", default=False, example="true"),

    _S("guest", "init", _enum(("systemd", "job")),
       "What the kernel starts. systemd: the image's services start, then the job's. job: "
       "vmbuild's own small init mounts the kernel's file systems and runs the job directly, "
       "with no services at all and no mounts from /etc/fstab (about 2 s less of every job "
       "start under TCG). A job that "
       "needs a daemon installed by its steps keeps systemd; job.network, guest.ssh and "
       "guest.vmware_tools need it.", default="systemd", example="systemd"),
    _S("guest", "modules",
       _list_of(_regex_type("kernel module name", _MODULE_PATTERN,
                            "a kernel module name (letters, digits, _ and -)"), unique=True),
       "Kernel modules kept in the image beyond vmbuild's own list (the virtual hardware's "
       "drivers and common file systems; the manifest's guest.modules_kept lists them). The "
       "seal deletes every other module, so a job that loads one of its own names it here. "
       "Each is kept with the modules it depends on.", default=[],
       example="[wireguard, nf_tables]"),

    _S("application", "files", _file_entries(),
       "Files and directories copied into the image, in order.", default=[],
       example='[{src: app/, dest: /opt/hello/, mode: "0755", owner: root}]'),
    _S("application", "run", _list_of(_ANY_STRING),
       "Shell steps run as root in the guest at build time, in order, kept verbatim.",
       default=[], example='["python3 -m compileall /opt/hello"]'),
    _S("application", "playbook", _Type("path", _parse_playbook, {"type": "string"}),
       "Ansible playbook (relative path) applied to the guest after files and run.",
       example="provision.yml"),

    _S("application.files[]", "src", _Type("path", _parse_src, {"type": "string"}),
       "File or directory relative to the recipe's directory; it must exist and stay inside "
       "that directory (no .., no absolute path, no symlink pointing out). A trailing / means "
       "the directory's contents.", required=True, example="app/"),
    _S("application.files[]", "dest", _ABS, "Absolute path in the guest.", required=True,
       example="/opt/hello/"),
    _S("application.files[]", "mode", _Type("octal string", _parse_mode,
                                            {"type": "string", "pattern": _MODE_PATTERN}),
       'Octal mode as a quoted string, e.g. "0755".', example='"0755"'),
    _S("application.files[]", "owner", _regex_type("owner", _OWNER_PATTERN,
                                                   "a user name, optionally with :group"),
       "Owner, as user or user:group.", example="root"),

    _S("job", "command", _COMMAND,
       "argv list (no shell; the program is an absolute path or a name in PATH), or a string "
       "run by /bin/sh -c. An extending recipe replaces it instead of appending.",
       required=True, replace=True, example='["/usr/bin/python3", "/opt/hello/main.py"]'),
    _S("job", "workdir", _ABS, "Working directory of the job.", default="/",
       example="/opt/hello"),
    _S("job", "user", _regex_type("user name", _USER_PATTERN, "a valid user name"),
       "User the job runs as; created if missing.", default="root", example="app"),
    _S("job", "environment", _ENVIRONMENT,
       "Environment variables; values are strings, numbers are kept as written.", default={},
       example="{GREETING: hello}"),
    _S("job", "timeout", _DURATION,
       "The job is killed and the VM powered off after this (90s, 30m, 2h, 1d, 1h30m, or "
       "seconds).", default_doc="none", example="2h"),
    _S("job", "network", _BOOL,
       "true: a NIC is configured and the job waits for network-online.", default=False,
       example="true"),
    _S("job", "outputs", _ABS,
       "Directory in the guest returned to the host when the job ends.", default_doc="none",
       example="/var/lib/job/output"),

    _S("output", "hardware_version", _int(4, 21),
       "VMware virtualHW.version (19 needs Workstation/Player 16.2, Fusion 12.2 or ESXi 7.0 "
       "U2 or later).", default=19, example="19"),
    _S("output", "guest_os", _regex_type("VMware guestOS", _GUEST_OS_PATTERN,
                                         "a VMware guestOS identifier"),
       "VMware guestOS identifier.",
       default_doc="from guest.release: buster debian10-64, bullseye debian11-64, bookworm "
                   "and trixie debian12-64, else other5xlinux-64", example="debian12-64"),
    _S("output", "disk_controller", _enum(("pvscsi", "lsilogic", "sata", "nvme")),
       "Virtual disk controller. nvme needs guest.firmware: efi (VMware's BIOS cannot boot "
       "from NVMe).", default="pvscsi", example="nvme"),
    _S("output", "nic", _enum(("vmxnet3", "e1000e", "e1000")),
       "Network card, used only when job.network is true.", default="vmxnet3",
       example="e1000e"),
    _S("output", "vmdk", _enum(("monolithicSparse", "streamOptimized")),
       "VMDK disk format.", default="monolithicSparse", example="streamOptimized"),
    _S("output", "formats", _list_of(_FORMAT, unique=True, nonempty=True),
       "Artifacts to produce: vmx (vmdk + vmx). ova is not supported yet.", default=["vmx"],
       example="[vmx]"),

    _S("validate", "command", _COMMAND,
       "What the validation boot runs instead of job.command (same forms: an argv list, or a "
       "string run by /bin/sh -c), e.g. a self-test. An extending recipe replaces it.",
       default_doc="job.command as written", replace=True,
       example='["/opt/hello/main.py", "--selftest"]'),
    _S("validate", "inputs", _INPUTS,
       "Files and directories of the recipe's directory attached as the input disk, exactly as "
       "`vmbuild run --input` attaches them: each under its own name in $VMBUILD_INPUT. They "
       "must exist and stay inside that directory (no .., no absolute path, no symlink "
       "pointing out).", default=[], example="[testdata/]"),
    _S("validate", "environment", _ENVIRONMENT,
       "Variables merged over job.environment for the validation boot only.", default={},
       example='{SMOKE: "1"}'),
    _S("validate", "expect", _section("validate.expect"),
       "What the validation boot must see for the image to pass.", default={}),
    _S("validate", "until", _enum(("exit", "started")),
       "exit: the job must finish (with expect.exit) before validate.timeout. started: the "
       "boot passes once the job has started and kept running for validate.running_for; then "
       "the VM is shut down cleanly (for jobs that run for hours).", default="exit",
       example="started"),
    _S("validate", "running_for", _DURATION,
       "With until: started, how long the job must keep running; must be shorter than "
       "validate.timeout. No effect with until: exit.", default="30s", example="20s"),
    _S("validate", "timeout", _DURATION,
       "The boot test fails when it has not passed within this.", default="10m",
       example="15m"),

    _S("validate.expect", "exit", _int(0, 255),
       "The exit status the job must report (with until: exit).", default=0, example="0"),
    _S("validate.expect", "output", _REGEX,
       "A Python regular expression that must match a line of the job's output; checked "
       "when the recipe is loaded.", example='"^RESULT [0-9]+$"'),
)
del _S

_SECTIONS: dict[str, tuple[Setting, ...]] = {}
for _setting in SETTINGS:
    _SECTIONS[_setting.section] = (*_SECTIONS.get(_setting.section, ()), _setting)
_REPLACED_LISTS = frozenset(s.path for s in SETTINGS if s.replace)

_GUEST_OS_BY_RELEASE = {
    "buster": "debian10-64",
    "bullseye": "debian11-64",
    "bookworm": "debian12-64",
    "trixie": "debian12-64",  # no newer Debian guestOS id is known to VMware products yet
}


def _from_python(value: object, loc: _Loc) -> _Node:
    """A node for a table default, so defaults go through the same parser as written values."""
    if isinstance(value, dict):
        return _Node(loc, mapping={str(k): (loc, _from_python(v, loc)) for k, v in value.items()})
    if isinstance(value, list):
        return _Node(loc, items=[_from_python(v, loc) for v in value])
    return _Node(loc, scalar=value, raw=str(value))


def _parse_section(
    section: str, node: _Node | None, field_: str, missing_at: _Loc
) -> dict[str, Any]:
    """Check one mapping against its rows of the table; return every key's value or default.

    An unknown key is an error (with a difflib suggestion): a typo must never be ignored.
    """
    settings = _SECTIONS[section]
    entries: dict[str, tuple[_Loc, _Node]] = {}
    if node is not None and not node.is_null:
        if node.mapping is None:
            _fail(node.loc, field_, f"expected a mapping, got {_kind(node)}")
        entries = node.mapping
    known = [s.key for s in settings]
    for key, (key_loc, _) in entries.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
            _fail(key_loc, _join(field_, key), f"unknown key ({hint})")
    values: dict[str, Any] = {}
    for s in settings:
        where = _join(field_, s.key)
        if s.key in entries:
            value = entries[s.key][1]
            if value.is_null and s.nullable:
                values[s.key] = None
            else:
                values[s.key] = s.type.parse(value, where)
        elif s.required:
            _fail(missing_at, where, "required, but not given")
        elif s.type.name == "section":
            values[s.key] = _parse_section(s.path, None, where, missing_at)
        elif s.default is None:
            values[s.key] = None
        else:
            values[s.key] = s.type.parse(_from_python(s.default, missing_at), where)
    return values
