"""Pack the runner alone into a single-file zipapp for execute nodes.

The archive holds ``vmbuild/__init__.py``, ``vmbuild/errors.py``, ``vmbuild/runner/**`` and
the pure-Python ``qemu.qmp`` package, with a ``__main__.py`` calling
:func:`vmbuild.runner.main.main`; ``python3 vmbuild-run.pyz run IMAGE.vmx`` then works on a
node where nothing but python3 (>= 3.9... in practice the version the runner is tested on,
3.11) is installed. Nothing of the build side (recipes, Packer, Ansible, YAML) is included.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

MAIN = """\
import sys

from vmbuild.runner.main import main

sys.exit(main(sys.argv[1:]))
"""


def _package_files(root: Path, prefix: str) -> list[tuple[Path, str]]:
    """(file, name in the archive) for every .py/py.typed under ``root``."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py") or name == "py.typed":
                path = Path(dirpath) / name
                found.append((path, f"{prefix}/{path.relative_to(root).as_posix()}"))
    return found


def bundle_members() -> list[tuple[Path, str]]:
    import qemu.qmp  # type: ignore[import-untyped,unused-ignore]

    import vmbuild

    package = Path(vmbuild.__file__).parent
    qmp = Path(qemu.qmp.__file__).parent
    members = [(package / "__init__.py", "vmbuild/__init__.py"),
               (package / "errors.py", "vmbuild/errors.py")]
    members += [m for m in _package_files(package / "runner", "vmbuild/runner")
                if m[1] != "vmbuild/runner/bundle.py"]
    # Installed, qemu is a namespace package; zipimport does not find namespace packages,
    # so the archive gets an empty qemu/__init__.py (see write_bundle).
    members += [m for m in _package_files(qmp, "qemu/qmp")
                if not m[1].endswith(("qmp_tui.py", "qmp_shell.py"))]
    return members


def write_bundle(path: Path | str) -> None:
    """Write the zipapp to ``path`` (atomically, executable, ``#!/usr/bin/env python3``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for source, name in bundle_members():
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, source.read_bytes())
            info = zipfile.ZipInfo("qemu/__init__.py", date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, "")
            info = zipfile.ZipInfo("__main__.py", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, MAIN)
    os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, path)
