"""The Packer template and Packer's machine-readable output."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vmbuild.stages.packer import (
    EVENT_MARKER,
    PackerRun,
    PackerVersion,
    _ui_event,
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


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer is not installed")
def test_real_packer_validates_the_generated_template(tmp_path: Path) -> None:
    from vmbuild.stages.packer import packer_version

    version = packer_version()
    job = reference_job()
    disk = tmp_path / "app-input.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    key = tmp_path / "build_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    job = type(job)(**{**job.__dict__, "disk": disk, "output_dir": tmp_path / "out",
                       "ssh_key": key, "host_key": key})
    template = write_template(job, version, tmp_path)
    if version.needs_plugins:
        pytest.skip("this Packer needs the qemu plugin installed (packer init)")
    PackerRun(template, lambda e: None).validate()
