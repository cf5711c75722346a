"""The `vmbuild` command: argument handling and presentation only; the work is in the library.

`vmbuild RECIPE.yaml` is shorthand for `vmbuild build RECIPE.yaml`.
Exit statuses: 0 success; 1 build failed; 2 bad input (recipe, options); 3 validation failed;
130 interrupted.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vmbuild import __version__
from vmbuild.cli_schedulers import register as register_schedulers
from vmbuild.errors import UsageError, VmbuildError
from vmbuild.events import Event

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Build a validated VMware job image from a YAML recipe, and run it like a process.\n\n"
         "`vmbuild RECIPE.yaml` is shorthand for `vmbuild build RECIPE.yaml`.",
    epilog="Exit statuses of build/check/validate: 0 ok; 1 build failed; 2 bad input "
           "(recipe, option, path); 3 validation failed; 130 interrupted. "
           "`vmbuild run` exits with the job's own status, 85 after a checkpoint, 90 VM failed "
           "to start, 91 job timed out, 92 VM died without a status.",
)

_START = time.monotonic()


class Presenter:
    """Human progress lines on stderr, or JSON lines on stdout for pipelines (--json)."""

    def __init__(self, json_mode: bool, verbose: bool = False) -> None:
        self.json_mode = json_mode
        self.verbose = verbose

    def __call__(self, event: Event) -> None:
        if self.json_mode:
            print(json.dumps(event.to_json()), flush=True)
            return
        if event.kind == "step" and event.stage == "packer" and not self.verbose \
                and not event.message.startswith(("==>", "Starting", "Waiting", "Connected",
                                                  "Gracefully", "Provisioning")):
            return
        stamp = f"[{time.monotonic() - _START:5.0f}s]"
        prefix = {"output": "  | ", "error": "ERROR ", "warning": "warning: "}.get(event.kind, "")
        print(f"{stamp} {event.stage}: {prefix}{event.message}", file=sys.stderr, flush=True)
        if event.kind == "error" and event.data.get("stderr"):
            for line in str(event.data["stderr"]).splitlines()[-20:]:
                print(f"{' ' * len(stamp)}   stderr: {line}", file=sys.stderr, flush=True)

    def result(self, payload: dict[str, Any], text: str) -> None:
        if self.json_mode:
            print(json.dumps({"result": payload}), flush=True)
        else:
            print(text, flush=True)


def _interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM (a CI job cancelled) takes the same clean path as Ctrl-C."""
    raise KeyboardInterrupt


def _fail(exc: VmbuildError, presenter: Presenter | None = None) -> None:
    if presenter is not None and presenter.json_mode:
        print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}), flush=True)
    print(f"vmbuild: error: {exc}", file=sys.stderr, flush=True)
    raise typer.Exit(exc.exit_code)


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="The recipe file (YAML).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output directory for the image [default: ./out/NAME].")] = None,
    no_validate: Annotated[bool, typer.Option(
        "--no-validate", help="Skip the lint and the boot test.")] = False,
    refresh_base: Annotated[bool, typer.Option(
        "--refresh-base", help="Rebuild the cached base image even if one matches.")] = False,
    boot_timeout: Annotated[float | None, typer.Option(
        help="Seconds the validation boot may take before it fails "
             "[default: the recipe's validate.timeout, 10m].")] = None,
    keep_work: Annotated[bool, typer.Option(
        help="Keep the temporary work directory (logs, playbook) for debugging.")] = False,
    json_out: JsonOpt = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show every Packer line.")] = False,
) -> None:
    """Build the image a recipe describes: base (cached), Packer + Ansible, VMDK + VMX, validate."""
    from vmbuild.pipeline import BuildOptions, build_image
    from vmbuild.recipe import load_recipe

    presenter = Presenter(json_out, verbose)
    try:
        loaded = load_recipe(recipe)
        out = output or Path("out") / loaded.name
        options = BuildOptions(output_dir=out, validate=not no_validate,
                               boot_timeout=boot_timeout, refresh_base=refresh_base,
                               keep_work=keep_work)
        signal.signal(signal.SIGTERM, _interrupt)
        result = build_image(loaded, options, presenter)
    except VmbuildError as exc:
        _fail(exc, presenter)
    except KeyboardInterrupt:
        print("vmbuild: interrupted; the build was stopped and nothing was published",
              file=sys.stderr)
        raise typer.Exit(130) from None
    base = "reused the cached base image" if result.base_cached else "built a new base image"
    checked = "not validated"
    if result.validated:
        checked = "validated by a boot test (" + _proof(result.validation) + ")"
    sizes = result.manifest["sizes"]
    payload = {"output_dir": str(result.output_dir), "vmx": str(result.vmx),
               "vmdk": str(result.vmdk), "base_cached": result.base_cached,
               "validated": result.validated, "validation": result.validation,
               "seconds": round(result.seconds, 1),
               "sizes": sizes, "timings": result.manifest.get("timings", {})}
    presenter.result(payload, f"image: {result.vmx}\n"
                              f"disk:  {result.vmdk} ({sizes['vmdk'] / 2**20:.0f} MiB)\n"
                              f"{base}; {checked}; "
                              f"{result.seconds:.0f}s")


@app.command()
def check(recipe: Annotated[Path, typer.Argument(help="The recipe file (YAML).")],
          json_out: JsonOpt = False) -> None:
    """Validate a recipe without building; print its effective settings with --json."""
    from vmbuild.recipe import load_recipe, recipe_to_dict

    try:
        loaded = load_recipe(recipe)
    except VmbuildError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(recipe_to_dict(loaded), indent=2, sort_keys=True))
    else:
        print(f"{recipe}: ok ({loaded.name})")


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print the recipe reference (docs/recipe.md) instead.")] = False,
) -> None:
    """Print the JSON Schema of the recipe format (for yaml-language-server and editors), or
    with --markdown the reference of every key (an installed vmbuild has no docs/ folder)."""
    if markdown:
        from vmbuild.recipe.reference import render_reference

        print(render_reference(), end="")
        return
    from vmbuild.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


def _proof(validation: dict[str, Any]) -> str:
    """Which mode proved an image, in words (build summary, validate result)."""
    if validation.get("mode") == "started":
        how = "powered off cleanly" if validation.get("clean_shutdown") else "was stopped"
        return (f"until started: the job ran {validation.get('ran_for', 0):.0f}s, "
                f"then the VM {how}")
    return f"until exit: the job exited {validation.get('status')}"


def _duration(text: str | None, option: str) -> float | None:
    from vmbuild.recipe import parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


@app.command()
def validate(
    vmx: Annotated[Path, typer.Argument(help="The image's .vmx file.")],
    no_boot: Annotated[bool, typer.Option(
        "--no-boot", help="Lint only; skip the boot test.")] = False,
    inputs: Annotated[list[Path] | None, typer.Option(
        "--input", help="A file or directory for the job's input disk ($VMBUILD_INPUT in the "
                        "guest), as `vmbuild run --input` attaches it. Repeatable.")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="KEY=VALUE for the job's environment, this boot only. Repeatable.")] = None,
    command: Annotated[str | None, typer.Option(
        help="Run this (with /bin/sh -c) instead of the image's job command, this boot only.")
    ] = None,
    expect_exit: Annotated[int, typer.Option(help="The exit status the job must report.")] = 0,
    expect_output: Annotated[str | None, typer.Option(
        help="A Python regex that must match a line of the job's output.")] = None,
    until: Annotated[str, typer.Option(
        help="exit: the job must finish; started: it must start and keep running for "
             "--running-for, then the VM is shut down (for jobs that run for hours).")] = "exit",
    running_for: Annotated[str, typer.Option(
        help="With --until started: how long the job must keep running.")] = "30s",
    timeout: Annotated[str | None, typer.Option(
        help="The boot test fails past this (e.g. 10m) [default: 10m].")] = None,
    boot_timeout: Annotated[float | None, typer.Option(
        help="The same as --timeout, in seconds.")] = None,
    logs: Annotated[Path | None, typer.Option(
        help="Keep the boot's console.log, job.log and control.log in this directory.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Lint a .vmx and its .vmdk, then boot it under QEMU and check the job: it ran to its
    expected exit status and the VM powered off, or (--until started) it started and kept
    running. Settings reach the guest for this boot only, on the input disk."""
    from vmbuild.stages.validate import (
        DEFAULT_BOOT_TIMEOUT,
        BootSpec,
        parse_env,
        result_data,
        validate_image,
    )

    presenter = Presenter(json_out)
    try:
        if until not in ("exit", "started"):
            raise UsageError(f"--until {until!r}: use exit or started")
        if expect_output is not None:
            try:
                re.compile(expect_output)
            except re.error as exc:
                raise UsageError(f"--expect-output: not a valid regex: {exc}") from None
        limit = _duration(timeout, "--timeout") or boot_timeout or DEFAULT_BOOT_TIMEOUT
        spec = BootSpec(command=("/bin/sh", "-c", command) if command else None,
                        inputs=tuple(inputs or ()), environment=parse_env(env or []),
                        expect_exit=expect_exit, expect_output=expect_output, until=until,
                        running_for=_duration(running_for, "--running-for") or 30.0,
                        timeout=limit)
        result = validate_image(vmx, presenter, boot_test=not no_boot, spec=spec, logs=logs)
    except VmbuildError as exc:
        _fail(exc, presenter)
    payload: dict[str, Any] = {"vmx": str(vmx), "ok": True}
    if result is None:
        presenter.result(payload, f"{vmx}: ok (lint only)")
        return
    payload["validation"] = result_data(result, spec)
    payload.update(status=result.status, seconds=round(result.seconds, 1))
    presenter.result(payload, f"{vmx}: ok ({_proof(payload['validation'])})")


@app.command()
def shell(
    vmx: Annotated[Path, typer.Argument(help="The image's .vmx file.")],
) -> None:
    """Boot the image with a root shell on its console instead of the job (the job does not
    run), to look at what the image holds. It runs on a throwaway layer: the image is never
    changed. `exit` in the shell powers the VM off; Ctrl-A X stops QEMU at once."""
    import tempfile

    from vmbuild.runner.core import RunnerError, RunOptions, run_backend
    from vmbuild.runner.qemu import QemuBackend

    if not vmx.is_file():
        _fail(UsageError(f"{vmx}: no such file"))
    if not sys.stdin.isatty():
        print("vmbuild shell: stdin is not a terminal; the shell will read it as typed input",
              file=sys.stderr)
    print(f"vmbuild shell: booting {vmx.name} with a root shell on its console (about 20 s "
          "under TCG); the job does not run; `exit` powers the VM off", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix="vmbuild-shell-") as tmp:
        options = RunOptions(vmx=vmx.resolve(), workdir=Path(tmp) / "run", shell=True,
                             quiet=True, start_timeout=None, checkpoint_signals=[])
        try:
            code = run_backend(QemuBackend, options)
        except RunnerError as exc:
            _fail(UsageError(str(exc)))
    raise typer.Exit(0 if code in (0, 92) else code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def run(ctx: typer.Context) -> None:
    """Run an image like a process: stream the job, exit with its status, checkpoint on
    SIGUSR1/SIGTERM/SIGQUIT (exit 85) and resume on the next start. See `vmbuild run --help`."""
    from vmbuild.runner.main import main as runner_main

    raise typer.Exit(runner_main(["run", *ctx.args]))


@app.command("runner-bundle")
def runner_bundle(
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Where to write the zipapp, e.g. vmbuild-run.pyz.")],
) -> None:
    """Write the runner alone as a single-file zipapp for execute nodes (plain python3 runs it:
    `python3 vmbuild-run.pyz run IMAGE.vmx`)."""
    from vmbuild.runner.bundle import write_bundle

    write_bundle(output)
    print(output)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(
        help="Where to write the new recipe; created if missing, refused if not empty.")],
    template: Annotated[str, typer.Option(
        help="python (a Python script), shell (a POSIX sh script) or binary (a C program "
             "compiled at build time).")] = "python",
    name: Annotated[str | None, typer.Option(
        help="The image name [default: DIRECTORY's name]; [a-z0-9][a-z0-9-]{0,62}.")] = None,
) -> None:
    """Start a new job image: a commented recipe.yaml, a tiny app and a README, which
    `vmbuild check` accepts and which builds as it stands."""
    from vmbuild.init import init_project

    try:
        written = init_project(directory, template, name)
    except VmbuildError as exc:
        _fail(exc)
    for path in written:
        print(path)
    print(f"next: vmbuild check {directory / 'recipe.yaml'} (see {directory / 'README.md'})",
          file=sys.stderr)


@app.command()
def version() -> None:
    """Print vmbuild's version."""
    print(__version__)


register_schedulers(app)

_COMMANDS = {"build", "check", "schema", "validate", "version", "run", "runner-bundle",
             "submit", "probe", "shell", "init"}


def main() -> None:
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        argv = ["build", *argv]
    app(args=argv, prog_name="vmbuild")


if __name__ == "__main__":
    main()
