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


# Hypothesis: in CI a fixed, derandomized profile, so a red run is reproducible from its log
# and a green one cannot depend on luck (tests/test_recipe_fuzz.py).
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the dev extra installs it; without it only the fuzz module fails
    pass
else:
    _hypothesis_settings.register_profile(
        "ci", derandomize=True, database=None, print_blob=True, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")


# CI cannot go green by skipping: with $CI set, a skipped test fails the run unless its node
# id matches an entry of tests/skip_allowlist.txt (fnmatch patterns, each with a `# why`).
# $VMBUILD_SKIP_ALLOWLIST names another list (the hook's own test uses an empty one).
SKIP_ALLOWLIST = Path(__file__).with_name("skip_allowlist.txt")
_skipped: dict[str, str] = {}  # node id -> skip reason
_BAD_SKIPS = pytest.StashKey[dict[str, str]]()


def load_skip_allowlist() -> list[str]:
    """The allow-list's patterns. An entry without a reason is refused: the list exists to
    say why each skip is acceptable in CI."""
    path = Path(os.environ.get("VMBUILD_SKIP_ALLOWLIST") or SKIP_ALLOWLIST)
    patterns = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry, _, why = line.partition("#")
        if not entry.strip():
            continue
        if not why.strip():
            raise pytest.UsageError(f"{path}:{number}: {entry.strip()!r} has no `# reason`")
        patterns.append(entry.strip())
    return patterns


def disallowed_skips(skipped: dict[str, str], patterns: list[str]) -> dict[str, str]:
    """The skips no allow-list pattern covers (a pattern matches a node id or its prefix)."""
    import fnmatch

    return {node: why for node, why in skipped.items()
            if not any(fnmatch.fnmatchcase(node, p) or node.startswith(p + "::")
                       for p in patterns)}


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped[report.nodeid] = why


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)  # a module skipped whole (pytestmark skipif, importorskip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, turn a run whose only problem is a skip outside the allow-list into a failure."""
    if not os.environ.get("CI") or not _skipped:
        return
    bad = disallowed_skips(_skipped, load_skip_allowlist())
    session.config.stash[_BAD_SKIPS] = bad
    if bad and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    bad = terminalreporter.config.stash.get(_BAD_SKIPS, {})
    if bad:
        terminalreporter.section("skips not allowed in CI", sep="=", red=True, bold=True)
        for node, why in sorted(bad.items()):
            terminalreporter.line(f"{node}: {why}", red=True)
        terminalreporter.line(f"CI fails on these: fix the set-up, or add the test to "
                              f"{SKIP_ALLOWLIST.relative_to(REPO)} with a `# reason`.")
