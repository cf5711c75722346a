"""``guest.vmware_tools: true``: open-vm-tools in the image, inert under QEMU.

The playbook test is fast. The slow one builds examples/hello with the key set (once, or
reused from $VMBUILD_TEST_IMAGES) and proves two things from its manifest: the package is in
the image, and the validation boot under QEMU passed with the tools' service skipped by its
``ConditionVirtualization=vmware`` (the boot's check command prints what systemd decided, and
``expect.output`` only matches when the service is inactive because its condition failed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, built_image
from vmbuild.recipe import load_recipe
from vmbuild.stages.playbook import VMWARE_TOOLS_PACKAGE, write_playbook

NAME = "hello-vmware-tools"
# Runs in the validation boot instead of hello's job (validate: settings are never baked
# into the image): wait until systemd has evaluated the service's conditions, say what it
# decided, then run the hello job as the image would.
CHECK = (
    "unit=open-vm-tools.service; "
    "for i in $(seq 60); do "
    '[ "$(systemctl show -p ConditionTimestampMonotonic --value $unit)" != 0 ] && break; '
    "sleep 1; done; "
    'echo "vmware-tools-check: virt=$(systemd-detect-virt)'
    ' installed=$(command -v vmtoolsd)'
    ' active=$(systemctl show -p ActiveState --value $unit)'
    ' condition=$(systemctl show -p ConditionResult --value $unit)"; '
    "exec /usr/bin/python3 /opt/hello/main.py"
)
EXPECT = (r"^vmware-tools-check: virt=(qemu|kvm) installed=/usr/bin/vmtoolsd "
          r"active=inactive condition=no$")


def write_recipe(directory: Path) -> Path:
    """examples/hello with ``guest.vmware_tools: true`` and the check above as its
    validation command; the image is hello's plus the tools (the same files otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLES / "hello" / "app", directory / "app", dirs_exist_ok=True)
    recipe = yaml.safe_load((EXAMPLES / "hello" / "recipe.yaml").read_text())
    recipe["name"] = NAME
    recipe.setdefault("guest", {})["vmware_tools"] = True
    recipe["guest"].pop("init", None)  # the tools are services: systemd starts them
    recipe["validate"] = {"command": CHECK, "expect": {"exit": 0, "output": EXPECT}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _tools_tasks(site: Path) -> list[dict[str, object]]:
    plays = yaml.safe_load(site.read_text().replace("!unsafe", ""))
    return [task for play in plays for task in play.get("tasks", [])
            if VMWARE_TOOLS_PACKAGE in str(task.get("name", ""))]


def test_playbook_installs_the_tools_only_when_asked(tmp_path: Path) -> None:
    with_tools = load_recipe(write_recipe(tmp_path / "with"))
    without = load_recipe(EXAMPLES / "hello" / "recipe.yaml")
    assert with_tools.guest.vmware_tools is True and without.guest.vmware_tools is False
    assert _tools_tasks(write_playbook(without, tmp_path / "stage-without")) == []
    tasks = _tools_tasks(write_playbook(with_tools, tmp_path / "stage-with"))
    assert len(tasks) == 1
    argv = tasks[0]["ansible.builtin.command"]["argv"]  # type: ignore[index]
    script = argv[-1]
    assert "apt-get" in script and "update" in script
    assert "--no-install-recommends" in script and script.rstrip().endswith("open-vm-tools")


def test_the_tools_do_not_change_the_base(tmp_path: Path) -> None:
    """They are installed by the app stage: both recipes share one cached base."""
    from vmbuild.stages.base import base_key

    with_tools = load_recipe(write_recipe(tmp_path / "with"))
    without = load_recipe(EXAMPLES / "hello" / "recipe.yaml")
    assert base_key(with_tools) == base_key(without)


@pytest.mark.slow
def test_image_with_vmware_tools_has_them_and_boots_under_qemu(images_dir: Path,
                                                               tmp_path: Path) -> None:
    vmx = built_image(images_dir, write_recipe(tmp_path / "recipe"), NAME)
    manifest = json.loads((vmx.parent / "manifest.json").read_text())
    assert manifest["packages"][VMWARE_TOOLS_PACKAGE].startswith("2:")  # Debian's epoch
    assert "ethtool" not in manifest["packages"]  # a recommend, not installed
    assert manifest["validated"] is True
    # A build whose validation boot misses expect.output fails and publishes nothing, so a
    # validated image means the check line matched: vmtoolsd installed, its service skipped
    # by its condition under QEMU; then hello ran and its result file came back.
    validation = manifest["validation"]
    assert validation["mode"] == "exit" and validation["status"] == 0
    assert validation["outputs"] == 1
