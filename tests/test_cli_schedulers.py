"""`vmbuild submit` / `vmbuild probe` as registered by vmbuild.cli_schedulers.register."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.scheduler_images import make_image
from vmbuild.cli_schedulers import register


@pytest.fixture
def app() -> typer.Typer:
    application = typer.Typer()

    @application.command()
    def version() -> None:  # a second command, so typer keeps subcommands
        """Print the version."""

    register(application)
    return application


def test_submit_condor_and_slurm(app: typer.Typer, tmp_path: Path) -> None:
    vmx = make_image(tmp_path / "image", memory_mib=2048)
    item = tmp_path / "case.txt"
    item.write_text("1")
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(vmx), "--scheduler", "condor", "-o",
                                 str(tmp_path / "c"), "--queue", "2", "--item", str(item),
                                 "--extra", "max_retries = 2", "--write-speed", "50"])
    assert result.exit_code == 0, result.output
    # the runner bundle is always written beside the submit file (no "not yet" fallback)
    assert result.output.split() == [str(tmp_path / "c" / "hello.sub"),
                                     str(tmp_path / "c" / "vmbuild-run.pyz")]
    assert "warning" not in result.output
    assert (tmp_path / "c" / "vmbuild-run.pyz").read_bytes().startswith(b"#!")
    sub = (tmp_path / "c" / "hello.sub").read_text()
    assert "max_retries = 2" in sub and "queue 2 vmbuild_input from (" in sub
    assert "job_max_vacate_time       = 112" in sub  # ceil((2048 / 50 + 15) * 2)
    result = runner.invoke(app, ["submit", str(vmx), "-s", "slurm", "-o", str(tmp_path / "s"),
                                 "--time", "4:00:00", "--no-bundle"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(tmp_path / "s" / "hello.sbatch")]
    assert "#SBATCH --time=4:00:00" in (tmp_path / "s" / "hello.sbatch").read_text()


def test_submit_errors_exit_2(app: typer.Typer, tmp_path: Path) -> None:
    vmx = make_image(tmp_path / "image")
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(vmx), "-s", "pbs", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "expected condor or slurm" in result.output
    result = runner.invoke(app, ["submit", str(vmx), "-s", "slurm", "-o", str(tmp_path),
                                 "--queue", "3"])
    assert result.exit_code == 2


def test_probe_commands(app: typer.Typer) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["probe", "--no-kvm-check"])
    assert result.exit_code == 0, result.output
    assert "VMBUILD_QEMU = " in result.output
    result = runner.invoke(app, ["probe", "--condor-config", "--runner", "/opt/v/vmbuild-run.pyz"])
    assert result.exit_code == 0
    assert "STARTD_CRON_VMBUILD_ENV = PYTHONPATH=/opt/v/vmbuild-run.pyz" in result.output
