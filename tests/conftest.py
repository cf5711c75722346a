"""Shared fixtures: the vmbuild CLI as a subprocess, and real images built once per session.

Images come from `$VMBUILD_TEST_IMAGES/<name>` when that holds a finished build (a developer
can reuse images between runs); otherwise they are built here with the real pipeline (Packer,
Ansible, QEMU), which is what CI does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_vmbuild(*args: str | Path, timeout: float = 1800, check: bool = False,
                env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmbuild.cli", *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"vmbuild {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def vmbuild() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_vmbuild


def _needs_build_host() -> None:
    missing = [t for t in ("packer", "qemu-system-x86_64", "mmdebstrap") if not shutil.which(t)]
    if missing:
        pytest.skip("build tools missing: " + ", ".join(missing) + " (run scripts/setup.sh)")
    # No root needed: an ordinary user builds the base in a user namespace (stages/base.py).


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("VMBUILD_TEST_IMAGES")
    return Path(env) if env else tmp_path_factory.mktemp("images")


def built_image(images_dir: Path, recipe: Path, name: str, *extra: str) -> Path:
    """Build `recipe` into images_dir/name (or reuse it); return the .vmx path."""
    out = images_dir / name
    vmx = out / f"{name}.vmx"
    if (out / "manifest.json").is_file() and vmx.is_file():
        return vmx
    _needs_build_host()
    proc = run_vmbuild(recipe, "-o", out, *extra)
    if proc.returncode != 0:
        raise AssertionError(f"building {recipe} failed ({proc.returncode}):\n{proc.stderr}")
    return vmx


@pytest.fixture(scope="session")
def hello_vmx(images_dir: Path) -> Path:
    return built_image(images_dir, EXAMPLES / "hello" / "recipe.yaml", "hello")


@pytest.fixture(scope="session")
def counter_vmx(images_dir: Path) -> Path:
    """The examples/counter image: counts 1..COUNT, one a second, to stdout and outputs."""
    return built_image(images_dir, EXAMPLES / "counter" / "recipe.yaml", "counter")
