"""The Packer template and Packer's machine-readable output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmbuild.errors import BuildError
from vmbuild.stages.packer import (
    EVENT_MARKER,
    PackerJob,
    PackerRun,
    PackerVersion,
    _ui_event,
    packer_version,
    parse_machine_line,
    reference_job,
    render_template,
    write_template,
)

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_templates_match_what_builds_render() -> None:
    for version, name in ((PackerVersion(1, 6, 6), "app-stage.json"),
                          (PackerVersion(1, 11, 0), "app-stage.pkr.json")):
        _, template = render_template(reference_job(), version)
        assert json.loads((REPO / "packer" / name).read_text()) == template, (
            f"packer/{name} is stale: run .venv/bin/python -m vmbuild.stages.packer packer")


def test_legacy_template_for_packer_1_6() -> None:
    name, template = render_template(reference_job(), PackerVersion(1, 6, 6))
    assert name.endswith(".json") and not name.endswith(".pkr.json")
    builder = template["builders"][0]
    assert builder["type"] == "qemu" and builder["disk_image"] is True
    assert "packer" not in template  # no required_plugins block before 1.7


def test_hcl2_template_requires_the_qemu_plugin() -> None:
    name, template = render_template(reference_job(), PackerVersion(1, 11, 0))
    assert name.endswith(".pkr.json")
    assert template["packer"]["required_plugins"]["qemu"]["source"] == \
        "github.com/hashicorp/qemu"
    assert template["build"]["sources"] == ["source.qemu.vmbuild"]


def test_paths_with_commas_are_escaped_for_qemu(tmp_path: Path) -> None:
    job = reference_job()
    odd = type(job)(**{**job.__dict__, "ssh_key": Path("/a,b/key")})
    _, template = render_template(odd, PackerVersion(1, 6, 6))
    args = template["builders"][0]["qemuargs"][0]
    assert args[1].endswith("file=/a,,b/key.pub")


def test_machine_readable_lines_are_unescaped() -> None:
    line = "1700000000,vmbuild,ui,say,==> vmbuild: one%!(PACKER_COMMA) two\\nthree\n"
    assert parse_machine_line(line) == ("vmbuild", "ui", ["say", "==> vmbuild: one, two\nthree"])
    assert parse_machine_line("not machine readable") is None


def test_provision_events_travel_through_packer_output() -> None:
    payload = {"stage": "provision", "kind": "error", "message": "task failed: x",
               "data": {"stderr": "boom"}}
    text = "    vmbuild (shell-local): " + EVENT_MARKER + json.dumps(payload)
    event = _ui_event("message", text)
    assert event is not None
    assert (event.stage, event.kind, event.message) == ("provision", "error", "task failed: x")
    assert event.data["stderr"] == "boom"


def _packer_job(tmp_path: Path) -> PackerJob:
    """The reference job with real files where Packer's validation looks (disk, keys)."""
    job = reference_job()
    disk = tmp_path / "app-input.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    key = tmp_path / "build_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return type(job)(**{**job.__dict__, "disk": disk, "output_dir": tmp_path / "out",
                        "ssh_key": key, "host_key": key})


def test_real_packer_validates_the_generated_template(tmp_path: Path) -> None:
    """The template for the installed Packer (scripts/setup.sh installs it: no skip when it
    is missing), validated by that Packer."""
    version = packer_version()
    template = write_template(_packer_job(tmp_path), version, tmp_path)
    if version.needs_plugins:
        pytest.skip("this Packer needs the qemu plugin installed (packer init)")
    PackerRun(template, lambda e: None).validate()


def test_packer_1_6_validates_the_hcl2_template_body(tmp_path: Path) -> None:
    """The Packer >= 1.7 template cannot be run here (Debian 12 has Packer 1.6.6 only; the
    qemu plugin cannot be downloaded), but Packer 1.6.6 reads `*.pkr.json` as HCL2 and has
    the qemu builder and shell-local provisioner built in: without its `packer {}` block
    (required_plugins, new in 1.7) the template's source and build blocks are validated by a
    real Packer. An unknown builder key is rejected, so the check does check."""
    if packer_version().needs_plugins:
        pytest.skip("Packer >= 1.7 is installed: the whole template is validated by "
                    "test_real_packer_1_7_validates_the_hcl2_template")
    name, template = render_template(_packer_job(tmp_path), PackerVersion(1, 11, 0))
    assert name == "template.pkr.json"
    del template["packer"]
    path = tmp_path / name
    path.write_text(json.dumps(template, indent=2))
    PackerRun(path, lambda e: None).validate()
    template["source"]["qemu"]["vmbuild"]["no_such_option"] = True
    path.write_text(json.dumps(template, indent=2))
    with pytest.raises(BuildError, match="no_such_option"):
        PackerRun(path, lambda e: None).validate()


def test_real_packer_1_7_validates_the_hcl2_template(tmp_path: Path) -> None:
    """The whole HCL2 template, `required_plugins` included, validated by Packer >= 1.7 with
    its qemu plugin. Runs only where such a Packer is installed (on the allow-list of skips,
    tests/skip_allowlist.txt: not installable on the Debian 12 CI machines)."""
    version = packer_version()
    if not version.needs_plugins:
        pytest.skip(f"Packer {version} is installed; this needs Packer >= 1.7 with the qemu "
                    "plugin (not packaged for Debian 12, and its plugin is downloaded from "
                    "GitHub)")
    template = write_template(_packer_job(tmp_path), version, tmp_path)
    assert template.name == "template.pkr.json"
    PackerRun(template, lambda e: None).validate()


def test_ci_fails_on_a_skip_outside_the_allow_list(tmp_path: Path) -> None:
    """The skip policy of tests/conftest.py, on the one skip this machine has: in CI
    (CI=true) the allow-listed Packer >= 1.7 test may skip; with an empty allow-list the same
    skip fails the run and is named; outside CI a skip is only a skip."""
    empty = tmp_path / "allowlist.txt"
    empty.write_text("# nothing may skip\n")
    node = "tests/test_packer.py::test_real_packer_1_7_validates_the_hcl2_template"

    def pytest_run(ci: bool, allowlist: Path | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "VMBUILD_SKIP_ALLOWLIST")}
        if ci:
            env["CI"] = "true"
        if allowlist:
            env["VMBUILD_SKIP_ALLOWLIST"] = str(allowlist)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               node], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    skipped = not packer_version().needs_plugins
    allowed = pytest_run(ci=True, allowlist=None)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    refused = pytest_run(ci=True, allowlist=empty)
    assert refused.returncode == (1 if skipped else 0), refused.stdout + refused.stderr
    if skipped:
        assert "skips not allowed in CI" in refused.stdout
        assert node in refused.stdout
        assert pytest_run(ci=False, allowlist=empty).returncode == 0
