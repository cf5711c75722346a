"""The research-shaped examples, end to end: an input-driven job proved with a shipped test
set and run on other data, and an hours-long job proved with `until: started`.

Each image is built once (or reused from $VMBUILD_TEST_IMAGES); the sums image is then
booted twice, once without inputs and once with other data, which is the least that shows
the validation inputs were not baked in and that real inputs reach the job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, built_image, run_vmbuild

pytestmark = pytest.mark.slow

SUMS = EXAMPLES / "sums"


@pytest.fixture(scope="module")
def sums_vmx(images_dir: Path) -> Path:
    return built_image(images_dir, SUMS / "recipe.yaml", "sums")


@pytest.fixture(scope="module")
def longjob_vmx(images_dir: Path) -> Path:
    return built_image(images_dir, EXAMPLES / "longjob" / "recipe.yaml", "longjob")


def _validation(vmx: Path) -> dict[str, object]:
    manifest = json.loads((vmx.parent / "manifest.json").read_text())
    validation = manifest["validation"]
    assert isinstance(validation, dict)
    return validation


def test_sums_was_proved_by_running_to_its_exit(sums_vmx: Path) -> None:
    validation = _validation(sums_vmx)
    assert validation["mode"] == "exit"
    assert validation["status"] == 0
    assert validation["outputs"] == 1  # result.txt came back from the validation boot
    assert "ran_for" not in validation


def test_longjob_was_proved_by_starting_and_running(longjob_vmx: Path) -> None:
    validation = _validation(longjob_vmx)
    assert validation["mode"] == "started"
    assert isinstance(validation["ran_for"], float) and validation["ran_for"] >= 20.0
    assert validation["clean_shutdown"] is True
    assert validation["status"] is None or validation["status"] != 0  # it never finished


def test_sums_without_input_fails_as_its_job_says(sums_vmx: Path, tmp_path: Path) -> None:
    proc = run_vmbuild("run", sums_vmx, "--backend", "qemu", "--workdir", tmp_path / "work",
                       "--output-dir", tmp_path / "res", timeout=900)
    assert proc.returncode == 66, proc.stdout + proc.stderr  # the job's EX_NOINPUT
    said = proc.stdout + proc.stderr
    assert "sums: error: no input files" in said
    assert "SUM" not in proc.stdout  # the validation test set is not in the image


def test_sums_on_other_data_prints_and_returns_the_sum(sums_vmx: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    proc = run_vmbuild("run", sums_vmx, "--backend", "qemu", "--workdir", tmp_path / "work",
                       "--input", SUMS / "other-data", "--output-dir", res, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 1.5 + 2.25 + 100, -3 + 1000 + 0.25 and 1 + 2 + 3 (in a subdirectory)
    assert "SUM 1107" in proc.stdout.splitlines(), proc.stdout
    assert "other-data/more/run3.txt: 3 numbers, sum 6" in proc.stdout
    assert (res / "result.txt").read_text().splitlines() == ["SUM 1107", "files 3",
                                                            "numbers 9"]
