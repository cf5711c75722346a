"""Recipe loader tests: defaults, extends, and one located error per kind of bad recipe."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from vmbuild.errors import RecipeError
from vmbuild.recipe import (
    SETTINGS,
    Application,
    Expect,
    Guest,
    Job,
    Output,
    Validate,
    format_size,
    load_recipe,
    parse_duration,
    parse_size,
    recipe_schema,
    recipe_to_dict,
    recipes_dir,
)

MINIMAL = """\
version: 1
name: hi
job:
  command: echo hello from the guest
"""

Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Write:
    """Write a recipe (and any extra files) under tmp_path, which becomes the cwd, so errors
    name files exactly as a user who typed `vmbuild check recipe.yaml` would see them."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "recipe.yaml", **files: str) -> Path:
        for rel, content in files.items():
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        return Path(name)

    return _write


def error_of(path: Path | str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "\n" not in text, text
    return text


# --- valid recipes ------------------------------------------------------------------------


def test_minimal_recipe_and_defaults(write: Write) -> None:
    recipe = load_recipe(write(MINIMAL))
    assert recipe.name == "hi"
    assert recipe.version == 1
    assert recipe.path == Path.cwd() / "recipe.yaml"
    assert recipe.path.is_absolute()
    assert recipe.job.command == ("/bin/sh", "-c", "echo hello from the guest")
    assert recipe.job == Job(command=recipe.job.command)
    g = recipe.guest
    assert (g.release, g.arch, g.mirror, g.packages) == ("bookworm", "amd64", None, ())
    assert (g.disk, g.memory, g.cpus, g.firmware) == (4 * 1024**3, 512 * 1024**2, 1, "bios")
    assert (g.hostname, g.timezone, g.ssh) == ("hi", "UTC", False)
    assert recipe.application == Application()
    assert recipe.output == Output()
    assert recipe.output.guest_os == "debian12-64"
    assert recipe.sources == (recipe.path,)


def test_table_defaults_match_dataclass_defaults() -> None:
    """The table and the agreed dataclasses must not drift apart."""
    from vmbuild.recipe import _from_python, _Loc  # the table's own default parsing

    loc = _Loc("t", 1, Path("/"))
    for section, cls in (("guest", Guest), ("job", Job), ("output", Output),
                         ("validate", Validate), ("validate.expect", Expect)):
        by_name = {f.name: f for f in fields(cls)}
        for s in SETTINGS:
            if s.section != section or s.default is None or s.type.name == "section":
                continue
            value = s.type.parse(_from_python(s.default, loc), s.path)
            f = by_name[s.key]
            expected = f.default_factory() if callable(f.default_factory) else f.default
            assert value == expected, s.path


FULL = """\
version: 1
name: hello
guest:
  release: bullseye
  arch: amd64
  mirror: http://mirror.example/debian
  packages: [python3, python3-yaml, libstdc++6]
  disk: 8GiB
  memory: 1G
  cpus: 2
  firmware: efi
  hostname: hello-vm
  timezone: Europe/Berlin
  ssh: true
application:
  files:
    - src: app/
      dest: /opt/hello/
      mode: "0755"
      owner: root
    - src: app/main.py
      dest: /opt/hello/main.py
      mode: "644"
      owner: app:staff
  run:
    - python3 -m compileall /opt/hello
  playbook: provision.yml
job:
  command: ["/usr/bin/python3", "/opt/hello/main.py"]
  workdir: /opt/hello
  user: app
  environment: {GREETING: hello, PORT: 8080, MODE: 0755, RATIO: 1.50}
  timeout: 1h30m
  network: true
  outputs: /var/lib/job/output
output:
  hardware_version: 21
  guest_os: debian11-64
  disk_controller: nvme
  nic: e1000e
  vmdk: streamOptimized
  formats: [vmx]
"""


def test_full_recipe(write: Write, tmp_path: Path) -> None:
    path = write(FULL, **{"app/main.py": "print('hi')\n", "provision.yml": "- hosts: all\n"})
    r = load_recipe(path)
    assert r.guest == Guest(
        release="bullseye", arch="amd64", mirror="http://mirror.example/debian",
        packages=("python3", "python3-yaml", "libstdc++6"), disk=8 * 1024**3,
        memory=1024**3, cpus=2, firmware="efi", hostname="hello-vm",
        timezone="Europe/Berlin", ssh=True,
    )
    first, second = r.application.files
    assert (first.src, first.src_path, first.contents) == ("app/", tmp_path / "app", True)
    assert (first.dest, first.mode, first.owner) == ("/opt/hello/", "0755", "root")
    assert (second.contents, second.mode, second.owner) == (False, "0644", "app:staff")
    assert second.src_path == tmp_path / "app" / "main.py"
    assert r.application.run == ("python3 -m compileall /opt/hello",)
    assert r.application.playbook == tmp_path / "provision.yml"
    assert r.job.command == ("/usr/bin/python3", "/opt/hello/main.py")
    assert (r.job.workdir, r.job.user, r.job.network) == ("/opt/hello", "app", True)
    # numbers are taken as written, not as YAML 1.1 re-reads them (0755 would be 493)
    assert dict(r.job.environment) == {
        "GREETING": "hello", "PORT": "8080", "MODE": "0755", "RATIO": "1.50"}
    assert r.job.timeout == 5400.0
    assert r.job.outputs == "/var/lib/job/output"
    assert r.output == Output(hardware_version=21, guest_os="debian11-64",
                              disk_controller="nvme", nic="e1000e", vmdk="streamOptimized")

    d = recipe_to_dict(r)
    json.dumps(d)
    assert d["application"]["files"][0]["src"] == "app/"
    assert d["application"]["files"][1]["src"] == "app/main.py"
    assert d["application"]["playbook"] == "provision.yml"
    assert d["guest"]["disk"] == 8 * 1024**3
    assert d["job"]["environment"] == {
        "GREETING": "hello", "MODE": "0755", "PORT": "8080", "RATIO": "1.50"}
    assert list(d) == ["version", "name", "guest", "application", "job", "output", "validate"]


def test_recipe_to_dict_is_location_independent(tmp_path: Path) -> None:
    dicts = []
    for where in ("a", "b/c"):
        d = tmp_path / where
        (d / "app").mkdir(parents=True)
        (d / "app" / "x").write_text("x")
        (d / "r.yaml").write_text(MINIMAL + "application:\n  files: [{src: app/, dest: /x}]\n")
        dicts.append(json.dumps(recipe_to_dict(load_recipe(d / "r.yaml")), sort_keys=True))
    assert dicts[0] == dicts[1]


def test_guest_os_follows_release(write: Write) -> None:
    for release, guest_os in (("buster", "debian10-64"), ("trixie", "debian12-64"),
                              ("sid", "other5xlinux-64")):
        r = load_recipe(write(MINIMAL + f"guest: {{release: {release}}}\n"))
        assert r.output.guest_os == guest_os


def test_verbatim_strings(write: Write) -> None:
    """Quotes, $, %, ; and newlines pass through untouched: another module escapes them."""
    tricky = "echo \"it's\" $HOME 100% ; rm -f 'x' \\n done\nsecond line"
    text = (
        "version: 1\nname: v\njob:\n  command:\n    - /bin/echo\n"
        f"    - {json.dumps(tricky)}\n"
        f"  environment:\n    MSG: {json.dumps(tricky)}\n"
        f"application:\n  run:\n    - {json.dumps(tricky)}\n"
        "    - |\n      for f in *; do echo \"$f\" 50%; done\n      printf '%s\\n' \"${X}\"\n"
    )
    r = load_recipe(write(text))
    assert r.job.command == ("/bin/echo", tricky)
    assert r.job.environment["MSG"] == tricky
    assert r.application.run == (
        tricky, "for f in *; do echo \"$f\" 50%; done\nprintf '%s\\n' \"${X}\"\n")
    r2 = load_recipe(write(MINIMAL.replace("echo hello from the guest", json.dumps(tricky))))
    assert r2.job.command == ("/bin/sh", "-c", tricky)


# --- extends ------------------------------------------------------------------------------


def test_shipped_base_recipe_exists() -> None:
    d = recipes_dir()
    assert d is not None and (d / "debian-12-minimal.yaml").is_file()


def test_extends_shipped_base(write: Write) -> None:
    text = """\
version: 1
name: hello
extends: debian-12-minimal
guest:
  memory: 1GiB
  packages: [python3]
job:
  command: [/bin/true]
"""
    r = load_recipe(write(text))
    assert r.guest.memory == 1024**3  # the extending recipe wins
    assert r.guest.disk == 4 * 1024**3 and r.guest.release == "bookworm"  # from the base
    assert r.guest.packages == ("python3",)
    base = recipes_dir()
    assert base is not None
    assert r.sources == (r.path, base / "debian-12-minimal.yaml")


def test_extends_maps_merge_lists_append(write: Write, tmp_path: Path) -> None:
    base = """\
version: 1
guest:
  packages: [curl, python3]
  cpus: 2
application:
  files: [{src: data/, dest: /srv/data}]
  run: [echo base]
job:
  command: [/bin/base]
  environment: {A: base, B: base}
  timeout: 30m
"""
    child = """\
name: child
extends: common/base.yaml
guest:
  packages: [jq, python3]
application:
  files: [{src: app.py, dest: /opt/app.py}]
  run: [echo child]
job:
  command: [/bin/child, arg]
  environment: {B: child, C: child}
"""
    path = write(child, **{"common/base.yaml": base, "common/data/x": "x", "app.py": "1"})
    r = load_recipe(path)
    assert r.version == 1  # from the base
    assert r.guest.packages == ("curl", "python3", "jq")  # appended, base first, repeats dropped
    assert r.guest.cpus == 2
    assert r.application.run == ("echo base", "echo child")
    # each src is resolved against the directory of the file that wrote it
    assert [f.src_path for f in r.application.files] == [
        tmp_path / "common" / "data", tmp_path / "app.py"]
    assert r.job.command == ("/bin/child", "arg")  # argv is replaced, never appended
    assert dict(r.job.environment) == {"A": "base", "B": "child", "C": "child"}
    assert r.job.timeout == 1800.0
    assert recipe_to_dict(r)["application"]["files"][0]["src"] == "common/data/"


def test_extends_chain_and_error_in_base_names_base(write: Write) -> None:
    write("version: 1\nguest:\n  cpus: 3\n", name="a.yaml")
    write("extends: a.yaml\nguest:\n  memory: 1GiB\n", name="b.yaml")
    r = load_recipe(write(MINIMAL + "extends: b.yaml\n"))
    assert (r.guest.cpus, r.guest.memory) == (3, 1024**3)
    write("version: 1\nguest:\n  cpus: 3\n  disk: lots\n", name="a.yaml")
    assert error_of("recipe.yaml") == (
        'a.yaml:4: guest.disk: "lots" is not a size (use 512MiB, 4GiB, 2G)')


def test_extends_cycle(write: Write) -> None:
    write("version: 1\nextends: recipe.yaml\n", name="b.yaml")
    msg = error_of(write(MINIMAL + "extends: b.yaml\n"))
    assert msg.startswith("b.yaml:2: extends: extends cycle:"), msg


def test_extends_unknown_name(write: Write) -> None:
    msg = error_of(write(MINIMAL + "extends: debian-99\n"))
    assert msg.startswith('recipe.yaml:5: extends: "debian-99": no such base recipe'), msg
    assert "debian-12-minimal" in msg


def test_extends_escape_refused(write: Write) -> None:
    msg = error_of(write(MINIMAL + "extends: ../other.yaml\n"))
    assert msg.startswith('recipe.yaml:5: extends: "../other.yaml" leaves the recipe'), msg


# --- bad recipes: one line, file:line, field ----------------------------------------------


def test_unknown_key(write: Write) -> None:
    assert error_of(write(MINIMAL + "guest:\n  memroy: 1G\n")) == (
        "recipe.yaml:6: guest.memroy: unknown key (did you mean memory?)")
    assert error_of(write(MINIMAL + "gust: {}\n")) == (
        "recipe.yaml:5: gust: unknown key (did you mean guest?)")
    msg = error_of(write(MINIMAL + "application:\n  files:\n    - {src: a, dset: /a}\n"))
    assert msg == "recipe.yaml:7: application.files[0].dset: unknown key (did you mean dest?)"


def test_wrong_type(write: Write) -> None:
    assert error_of(write(MINIMAL + "guest:\n  release: [bookworm]\n")) == (
        "recipe.yaml:6: guest.release: expected a string, got a list")
    assert error_of(write(MINIMAL + "guest:\n  cpus: two\n")) == (
        "recipe.yaml:6: guest.cpus: expected an integer, got a string")
    assert error_of(write(MINIMAL.replace("job:\n", "job:\n  network: \"true\"\n"))) == (
        "recipe.yaml:4: job.network: expected a boolean (true or false), got a string")
    assert error_of(write(MINIMAL + "guest: [1]\n")) == (
        "recipe.yaml:5: guest: expected a mapping, got a list")


def test_bad_size(write: Write) -> None:
    assert error_of(write(MINIMAL + "guest:\n  memory: 4 gigs\n")) == (
        'recipe.yaml:6: guest.memory: "4 gigs" is not a size (use 512MiB, 4GiB, 2G)')
    assert error_of(write(MINIMAL + "guest:\n  disk: 512MiB\n")) == (
        'recipe.yaml:6: guest.disk: "512MiB" is below the minimum of 1GiB')


def test_src_dotdot(write: Write, tmp_path: Path) -> None:
    (tmp_path.parent / "x").mkdir(exist_ok=True)
    msg = error_of(write(MINIMAL + "application:\n  files: [{src: ../x, dest: /x}]\n"))
    assert msg.startswith('recipe.yaml:6: application.files[0].src: "../x" leaves the recipe'), msg


def test_src_the_os_cannot_look_up(write: Write) -> None:
    """A name longer than the filesystem allows (found by the recipe fuzzer): a located
    error, not an OSError traceback."""
    msg = error_of(write(MINIMAL + f"application:\n  files: [{{src: {'x' * 300}, dest: /x}}]\n"))
    assert msg.startswith("recipe.yaml:6: application.files[0].src: ") and \
        "cannot be looked up: File name too long" in msg, msg


def test_src_symlink_escape(write: Write, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    path = write(MINIMAL + "application:\n  files: [{src: link, dest: /x}]\n")
    (tmp_path / "link").symlink_to(outside / "secret")
    msg = error_of(path)
    assert msg.startswith('recipe.yaml:6: application.files[0].src: "link" goes through a '
                          "symlink to"), msg
    # a symlink inside a copied directory is refused too
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "key").symlink_to(outside / "secret")
    msg = error_of(write(MINIMAL + "application:\n  files: [{src: app/, dest: /x}]\n"))
    assert msg.startswith('recipe.yaml:6: application.files[0].src: "app/" contains key, a '
                          "symlink to"), msg


def test_src_absolute_and_missing(write: Write) -> None:
    msg = error_of(write(MINIMAL + "application:\n  files: [{src: /etc/passwd, dest: /x}]\n"))
    assert msg.startswith('recipe.yaml:6: application.files[0].src: "/etc/passwd" is absolute'), msg
    msg = error_of(write(MINIMAL + "application:\n  files: [{src: nope.txt, dest: /x}]\n"))
    assert msg.startswith('recipe.yaml:6: application.files[0].src: "nope.txt" does not exist'), msg
    msg = error_of(write(MINIMAL + "application:\n  files: [{src: f/, dest: /x}]\n", f="1"))
    assert msg == 'recipe.yaml:6: application.files[0].src: "f/" is not a directory'


def test_missing_required(write: Write) -> None:
    assert error_of(write("version: 1\nname: hi\njob:\n  user: root\n")) == (
        "recipe.yaml:4: job.command: required, but not given")
    assert error_of(write("version: 1\nname: hi\n")) == (
        "recipe.yaml:1: job: required, but not given")
    assert error_of(write("version: 1\njob: {command: x}\n")) == (
        "recipe.yaml:1: name: required, but not given")
    assert error_of(write("name: hi\njob: {command: x}\n")) == (
        "recipe.yaml:1: version: required, but not given")


def test_yaml_syntax_error(write: Write) -> None:
    msg = error_of(write("version: 1\nname: hi\njob:\n  command: [a, b\n"))
    assert re.fullmatch(r"recipe\.yaml:\d+: YAML syntax error: .+", msg), msg
    msg = error_of(write("version: 1\nname: hi\n  bad: indent\n"))
    assert msg.startswith("recipe.yaml:3: YAML syntax error: "), msg
    assert error_of(write("version: 1\nname: \"a\x01\"\n")) == (
        "recipe.yaml:2: YAML syntax error: special characters are not allowed (character #x0001)")
    assert error_of(write("version: 1\n---\nname: x\n")) == (
        "recipe.yaml:2: YAML syntax error: expected a single document in the stream but found "
        "another document")
    assert error_of(write("version: 1\nname: [a\n")) == (
        "recipe.yaml:2: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence on line 2)")


def test_empty_and_not_a_mapping(write: Write) -> None:
    assert error_of(write("")) == "recipe.yaml: the recipe is empty"
    assert error_of(write("- a\n- b\n")).startswith("recipe.yaml:1: a recipe is a mapping")


def test_duplicate_key(write: Write) -> None:
    assert error_of(write(MINIMAL + "name: again\n")) == (
        "recipe.yaml:5: name: duplicate key (first given on line 2)")


def test_version_2(write: Write) -> None:
    assert error_of(write(MINIMAL.replace("version: 1", "version: 2"))) == (
        "recipe.yaml:1: version: version 2 is not supported: this vmbuild reads recipe "
        "version 1 (see docs/recipe.md)")
    assert error_of(write(MINIMAL.replace("version: 1", 'version: "1"'))) == (
        "recipe.yaml:1: version: expected the integer 1, got a string")


def test_bad_duration_message_matches_recipe_md(write: Write) -> None:
    text = MINIMAL + "\n" * 8 + "job:\n  timeout: 2 hours\n"
    write(text.replace("job:\n  command: echo hello from the guest\n", "") +
          "  command: x\n")
    assert error_of("recipe.yaml") == (
        'recipe.yaml:12: job.timeout: "2 hours" is not a duration (use 90s, 30m, 2h)')


def test_mode_as_int(write: Write) -> None:
    for written in ("755", "0755"):
        msg = error_of(write(MINIMAL + f"application:\n  files: [{{src: f, dest: /f, "
                                       f"mode: {written}}}]\n", f="1"))
        assert msg == (
            f'recipe.yaml:6: application.files[0].mode: {written} must be a quoted string such '
            'as "0755": unquoted, YAML reads it as an integer')


@pytest.mark.parametrize(("snippet", "expected"), [
    ("guest:\n  arch: arm64\n",
     'guest.arch: "arm64": only amd64 is supported in recipe version 1'),
    ("guest:\n  firmware: uefi\n", 'guest.firmware: "uefi" is not one of bios, efi'),
    ("guest:\n  mirror: ftp://x/debian\n", 'guest.mirror: "ftp://x/debian" is not an http'),
    ("guest:\n  packages: [Python3]\n", 'guest.packages[0]: "Python3" is not a Debian'),
    ("guest:\n  cpus: 65\n", "guest.cpus: 65 is out of range (1 to 64)"),
    ("guest:\n  memory: 64MiB\n", 'guest.memory: "64MiB" is below the minimum of 128MiB'),
    ("guest:\n  hostname: a_b\n", 'guest.hostname: "a_b" is not a valid host name'),
    ("guest:\n  timezone: Europe/../x\n", 'guest.timezone: "Europe/../x" is not a time zone'),
    ("output:\n  formats: [ova]\n", 'output.formats[0]: "ova": not supported yet'),
    ("output:\n  hardware_version: 3\n", "output.hardware_version: 3 is out of range"),
    ("output:\n  nic: e1000ee\n", 'output.nic: "e1000ee" is not one of vmxnet3, e1000e, e1000 '
     "(did you mean e1000e?)"),
    ("job:\n  workdir: opt\n", 'job.workdir: "opt" is not an absolute path'),
    ("job:\n  user: Root\n", 'job.user: "Root" is not a valid user name'),
    ("job:\n  environment: {1BAD: x}\n", 'job.environment.1BAD: "1BAD" is not a valid variable'),
    ("job:\n  environment: {A: true}\n",
     "job.environment.A: expected a string or a number, got a boolean"),
    ("job:\n  timeout: 0s\n", 'job.timeout: "0s" must be a positive duration'),
    ("job:\n  outputs: \"/a\\nb\"\n", "job.outputs: a path may not contain a newline"),
    ("job:\n  user: \"ro\\0ot\"\n", "job.user: contains a NUL character"),
    ("name2: x\n", "name2: unknown key (did you mean name?)"),
])
def test_more_bad_values(write: Write, snippet: str, expected: str) -> None:
    text = MINIMAL.replace("job:\n  command: echo hello from the guest\n", "")
    if snippet.startswith("job:"):
        text += snippet + "  command: x\n"
    else:
        text += snippet + "job:\n  command: x\n"
    msg = error_of(write(text))
    assert re.match(r"recipe\.yaml:\d+: ", msg), msg
    assert msg.split(": ", 1)[1].startswith(expected), msg


def test_bad_name_and_command(write: Write) -> None:
    assert error_of(write(MINIMAL.replace("name: hi", "name: Hi"))).startswith(
        'recipe.yaml:2: name: "Hi" is not a valid name')
    assert error_of(write("version: 1\nname: hi\njob:\n  command: [bin/x]\n")).startswith(
        'recipe.yaml:4: job.command[0]: "bin/x": the program must be an absolute path')
    assert error_of(write("version: 1\nname: hi\njob:\n  command: []\n")) == (
        "recipe.yaml:4: job.command: is empty; give the program and its arguments")


def test_error_names_file_as_given(write: Write, tmp_path: Path) -> None:
    write(MINIMAL + "guest: {cpus: 0}\n", name="sub/dir/r.yaml")
    assert error_of("sub/dir/r.yaml").startswith("sub/dir/r.yaml:5: guest.cpus:")
    assert error_of(tmp_path / "sub/dir/r.yaml").startswith(f"{tmp_path}/sub/dir/r.yaml:5:")
    assert error_of("missing.yaml") == "missing.yaml: missing.yaml: no such file"


def test_playbook_rules(write: Write) -> None:
    assert error_of(write(MINIMAL + "application: {playbook: ../p.yml}\n")).startswith(
        'recipe.yaml:5: application.playbook: "../p.yml" leaves the recipe')
    assert error_of(write(MINIMAL + "application: {playbook: d}\n", **{"d/x": ""})) == (
        'recipe.yaml:5: application.playbook: "d" is not a file')


def test_yaml_tricks_refused(write: Write) -> None:
    msg = error_of(write(MINIMAL + "on: 1\n"))
    assert msg == 'recipe.yaml:5: on: a key must be a string, got a boolean (quote it: "on")'
    msg = error_of(write(MINIMAL + "guest: !!set {a, b}\n"))
    assert "unsupported YAML tag" in msg
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True))
    assert "too large" in error_of(write(bomb))
    # anchors and merge keys work, and explicit keys beat merged ones
    msg = error_of(write(MINIMAL + "guest: &g {cpus: 2}\napplication:\n  run: [*g]\n"))
    assert msg == "recipe.yaml:5: application.run[0]: expected a string, got a mapping"
    text = ("version: 1\nname: m\njob: &j {command: x, user: a}\n"
            "guest:\n  <<: {cpus: 3, memory: 1GiB}\n  cpus: 4\n")
    r = load_recipe(write(text))
    assert (r.guest.cpus, r.guest.memory) == (4, 1024**3)


def test_units() -> None:
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1024M") == 1024**3
    assert parse_size("10KiB") == 10240
    assert parse_size("2GB") == 2 * 1000**3
    assert parse_size("1.5GiB") == 1536 * 1024**2
    assert parse_size("4096") == 4096
    assert format_size(4 * 1024**3) == "4GiB" and format_size(1000) == "1000"
    assert parse_duration("90s") == 90.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("1d") == 86400.0
    assert parse_duration("45") == 45.0
    for bad in ("2 hours", "h", "1x", "-1s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_null_unsets_optional_and_empty_section(write: Write) -> None:
    r = load_recipe(write(MINIMAL + "guest:\napplication:\n"))
    assert r.guest == Guest(hostname="hi")
    r = load_recipe(write(MINIMAL.replace("job:\n", "job:\n  timeout: null\n")))
    assert r.job.timeout is None


# --- schema and docs ----------------------------------------------------------------------


def walk_objects(schema: object) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            found.append(schema)
        for value in schema.values():
            found += walk_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            found += walk_objects(value)
    return found


def test_schema() -> None:
    schema = recipe_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    objects = walk_objects(schema)
    # top, guest, application, a files entry, job, output, validate, validate.expect
    assert len(objects) == 8
    assert all(o["additionalProperties"] is False for o in objects)
    props = schema["properties"]
    assert props["guest"]["properties"]["memory"]["default"] == "512MiB"
    assert props["output"]["properties"]["disk_controller"]["enum"] == [
        "pvscsi", "lsilogic", "sata", "nvme"]
    assert props["job"]["required"] == ["command"]
    files = props["application"]["properties"]["files"]["items"]
    assert files["required"] == ["src", "dest"]
    assert schema["then"]["required"] == ["version", "name", "job"]
    assert all("description" in p for o in objects for p in o["properties"].values())  # type: ignore[attr-defined]


def test_schema_patterns_match_python() -> None:
    """The same regexes check values here and in editors: spot-check they agree."""
    guest = recipe_schema()["properties"]["guest"]["properties"]
    assert re.fullmatch(guest["disk"]["pattern"], "4GiB")
    assert not re.fullmatch(guest["disk"]["pattern"], "4 gigs")
    job = recipe_schema()["properties"]["job"]["properties"]
    assert re.fullmatch(job["timeout"]["pattern"], "1h 30m")
    assert not re.fullmatch(job["timeout"]["pattern"], "2 hours")


#: Every key of the recipe format contract (RECIPE.md, version 1 and its additions). None may
#: be renamed; the repository's own reference must list each one.
CONTRACT_KEYS = (
    "version", "name", "extends",
    "guest", "guest.release", "guest.arch", "guest.mirror", "guest.packages", "guest.disk",
    "guest.memory", "guest.cpus", "guest.firmware", "guest.hostname", "guest.timezone",
    "guest.vmware_tools",
    "application", "application.files", "application.files[].src",
    "application.files[].dest", "application.files[].mode", "application.files[].owner",
    "application.run", "application.playbook",
    "job", "job.command", "job.workdir", "job.user", "job.environment", "job.timeout",
    "job.network", "job.outputs",
    "output", "output.hardware_version", "output.guest_os", "output.disk_controller",
    "output.nic", "output.vmdk", "output.formats",
    "validate", "validate.command", "validate.inputs", "validate.environment",
    "validate.expect", "validate.expect.exit", "validate.expect.output", "validate.until",
    "validate.running_for", "validate.timeout",
)

#: The contract's own example (RECIPE.md's full recipe with its additions), kept here so it is
#: checked on every checkout, not only where the shared document happens to be.
CONTRACT_EXAMPLE = """\
version: 1
name: hello
extends: debian-12-minimal
guest:
  release: bookworm
  arch: amd64
  mirror: http://mirror.example/debian
  packages: [python3]
  disk: 4GiB
  memory: 512MiB
  cpus: 1
  firmware: bios
  hostname: hello
  timezone: UTC
  vmware_tools: false
application:
  files:
    - src: app/
      dest: /opt/hello/
      mode: "0755"
      owner: root
  run:
    - python3 -m compileall /opt/hello
  playbook: provision.yml
job:
  command: ["/usr/bin/python3", "/opt/hello/main.py"]
  workdir: /opt/hello
  user: root
  environment: {GREETING: hello}
  timeout: 2h
  network: false
  outputs: /var/lib/job/output
output:
  hardware_version: 19
  guest_os: debian12-64
  disk_controller: pvscsi
  nic: vmxnet3
  vmdk: monolithicSparse
  formats: [vmx]
validate:
  command: ["/opt/app/bin/app", "--selftest"]
  inputs: [testdata/]
  environment: {SMOKE: "1"}
  expect:
    exit: 0
    output: "^RESULT [0-9]+$"
  until: exit
  running_for: 30s
  timeout: 10m
"""


def test_every_contract_key_is_in_the_table_and_the_reference() -> None:
    """The repository's own reference (docs/recipe.md) lists every key of the contract."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipe.md").read_text()
    paths = {s.path for s in SETTINGS}
    missing = [k for k in CONTRACT_KEYS if k not in paths]
    assert not missing, f"keys of the contract missing from SETTINGS: {missing}"
    undocumented = [k for k in CONTRACT_KEYS if f"`{k}`" not in doc]
    assert not undocumented, f"keys missing from docs/recipe.md: {undocumented}"


def test_contract_example_loads(tmp_path: Path) -> None:
    """The contract's full example must load as written (with its files present)."""
    (tmp_path / "app").mkdir()
    (tmp_path / "testdata").mkdir()
    (tmp_path / "provision.yml").write_text("- hosts: all\n")
    (tmp_path / "recipe.yaml").write_text(CONTRACT_EXAMPLE)
    r = load_recipe(tmp_path / "recipe.yaml")
    assert r.name == "hello" and r.job.timeout == 7200.0
    assert os.fspath(r.application.files[0].src_path) == os.fspath(tmp_path / "app")
    assert r.guest.vmware_tools is False
    assert r.validate == Validate(
        command=("/opt/app/bin/app", "--selftest"), inputs=(tmp_path / "testdata",),
        environment={"SMOKE": "1"}, expect=Expect(exit=0, output="^RESULT [0-9]+$"),
        until="exit", running_for=30.0, timeout=600.0)


# --- validate: and the additions to version 1 ---------------------------------------------


def test_validate_and_vmware_tools_defaults(write: Write) -> None:
    r = load_recipe(write(MINIMAL))
    assert r.validate == Validate()
    v = r.validate
    assert (v.command, v.inputs, dict(v.environment)) == (None, (), {})
    assert v.expect == Expect(exit=0, output=None)
    assert (v.until, v.running_for, v.timeout) == ("exit", 30.0, 600.0)
    assert r.guest.vmware_tools is False
    assert recipe_to_dict(r)["validate"] == {
        "command": None, "inputs": [], "environment": {},
        "expect": {"exit": 0, "output": None},
        "until": "exit", "running_for": 30.0, "timeout": 600.0,
    }
    # an empty section means the defaults, like guest: left empty
    assert load_recipe(write(MINIMAL + "validate:\n")).validate == Validate()
    assert load_recipe(write(MINIMAL + "validate: {expect: {}}\n")).validate == Validate()


VALIDATE_FULL = """\
guest:
  vmware_tools: true
validate:
  command: ["/opt/app/bin/app", "--selftest"]
  inputs: [testdata/, extra.csv]
  environment: {SMOKE: "1", N: 0755}
  expect:
    exit: 3
    output: "^RESULT [0-9]+$"
  until: started
  running_for: 20s
  timeout: 1h
"""


def test_validate_full(write: Write, tmp_path: Path) -> None:
    path = write(MINIMAL + VALIDATE_FULL, **{"testdata/a.txt": "1 2\n", "extra.csv": "3\n"})
    r = load_recipe(path)
    assert r.guest.vmware_tools is True
    v = r.validate
    assert v.command == ("/opt/app/bin/app", "--selftest")
    assert v.inputs == (tmp_path / "testdata", tmp_path / "extra.csv")
    assert all(p.is_absolute() for p in v.inputs)
    assert dict(v.environment) == {"SMOKE": "1", "N": "0755"}
    assert v.expect == Expect(exit=3, output="^RESULT [0-9]+$")
    assert (v.until, v.running_for, v.timeout) == ("started", 20.0, 3600.0)
    d = recipe_to_dict(r)
    assert d["guest"]["vmware_tools"] is True
    assert d["validate"]["inputs"] == ["testdata", "extra.csv"]  # relative: hashes anywhere
    assert d["validate"]["expect"] == {"exit": 3, "output": "^RESULT [0-9]+$"}
    # a string is a shell command, exactly like job.command
    r = load_recipe(write(MINIMAL + "validate:\n  command: ./selftest && echo ok\n"))
    assert r.validate.command == ("/bin/sh", "-c", "./selftest && echo ok")
    assert r.job.command == ("/bin/sh", "-c", "echo hello from the guest")  # untouched


def test_validate_does_not_touch_the_base_key(write: Write, tmp_path: Path) -> None:
    """validate: is proof, not content: the cached base image must not be rebuilt for it."""
    from vmbuild.stages.base import base_key

    plain = load_recipe(write(MINIMAL))
    validated = load_recipe(write(MINIMAL + VALIDATE_FULL.replace("guest:\n  vmware_tools: "
                                                                  "true\n", ""),
                                  **{"testdata/a": "1", "extra.csv": "2"}))
    assert validated.validate != plain.validate
    assert base_key(validated) == base_key(plain)
    assert recipe_to_dict(validated) != recipe_to_dict(plain)  # but it is in the canonical form


@pytest.mark.parametrize(("snippet", "expected"), [
    ("validate:\n  command: []\n",
     "validate.command: is empty; give the program and its arguments"),
    ("validate:\n  command: [bin/x]\n",
     'validate.command[0]: "bin/x": the program must be an absolute path'),
    ("validate:\n  command: {a: b}\n",
     "validate.command: expected a list of strings (argv) or a string (a shell command), "
     "got a mapping"),
    ("validate:\n  inputs: testdata/\n", "validate.inputs: expected a list of paths, got a string"),
    ("validate:\n  environment: {1BAD: x}\n",
     'validate.environment.1BAD: "1BAD" is not a valid variable name'),
    ("validate:\n  environment: [A]\n",
     "validate.environment: expected a mapping of NAME: value, got a list"),
    ("validate:\n  expect: {exit: 256}\n", "validate.expect.exit: 256 is out of range (0 to 255)"),
    ("validate:\n  expect: {exit: -1}\n", "validate.expect.exit: -1 is out of range (0 to 255)"),
    ('validate:\n  expect: {exit: "0"}\n',
     "validate.expect.exit: expected an integer, got a string"),
    ("validate:\n  expect: {output: 5}\n", "validate.expect.output: expected a string, got an "
     "integer"),
    ("validate:\n  expect: {outptu: x}\n",
     "validate.expect.outptu: unknown key (did you mean output?)"),
    ("validate:\n  expect: [0]\n", "validate.expect: expected a mapping, got a list"),
    ("validate:\n  until: finished\n",
     'validate.until: "finished" is not one of exit, started'),
    ("validate:\n  until: start\n",
     'validate.until: "start" is not one of exit, started (did you mean started?)'),
    ("validate:\n  running_for: 2 hours\n",
     'validate.running_for: "2 hours" is not a duration (use 90s, 30m, 2h)'),
    ("validate:\n  timeout: 2 hours\n",
     'validate.timeout: "2 hours" is not a duration (use 90s, 30m, 2h)'),
    ("validate:\n  timeout: 0s\n", 'validate.timeout: "0s" must be a positive duration'),
    ("validate:\n  timeout: [1m]\n",
     "validate.timeout: expected a duration such as 2h, got a list"),
    ("validate:\n  expcet: {}\n", "validate.expcet: unknown key (did you mean expect?)"),
    ("validate: yes\n", "validate: expected a mapping, got a boolean"),
    ("guest:\n  vmware_tools: \"yes\"\n",
     "guest.vmware_tools: expected a boolean (true or false), got a string"),
    ("guest:\n  vmware_tool: true\n", "guest.vmware_tool: unknown key (did you mean "
     "vmware_tools?)"),
])
def test_validate_bad_values(write: Write, snippet: str, expected: str) -> None:
    msg = error_of(write(MINIMAL + snippet))
    line = MINIMAL.count("\n") + snippet.count("\n")  # the snippet's last line
    assert msg.startswith(f"recipe.yaml:{line}: {expected}"), msg


def test_validate_expect_output_invalid_regex(write: Write) -> None:
    error = None
    try:
        re.compile("^RESULT ([0-9]+$")
    except re.error as exc:
        error = str(exc)
    assert error is not None
    msg = error_of(write(MINIMAL + "validate:\n  expect:\n    output: \"^RESULT ([0-9]+$\"\n"))
    assert msg == ('recipe.yaml:7: validate.expect.output: "^RESULT ([0-9]+$" is not a valid '
                   f"Python regular expression: {error}")
    assert "missing ), unterminated subpattern" in msg


def test_validate_inputs_confined(write: Write, tmp_path: Path) -> None:
    (tmp_path.parent / "x").mkdir(exist_ok=True)
    at = "recipe.yaml:6: validate.inputs[0]: "
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [../x]\n"))
    assert msg.startswith(at + '"../x" leaves the recipe\'s directory'), msg
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [/etc/passwd]\n"))
    assert msg.startswith(at + '"/etc/passwd" is absolute'), msg
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [nope.csv]\n"))
    assert msg.startswith(at + '"nope.csv" does not exist'), msg
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [f/]\n", f="1"))
    assert msg == at + '"f/" is not a directory'
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    path = write(MINIMAL + "validate:\n  inputs: [link]\n")
    (tmp_path / "link").symlink_to(outside / "secret")
    msg = error_of(path)
    assert msg.startswith(at + '"link" goes through a symlink to'), msg
    # a symlink inside an input directory that points out would put that file on the disk
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "key").symlink_to(outside / "secret")
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [data/]\n"))
    assert msg.startswith(at + '"data/" contains key, a symlink to'), msg
    # ... while a symlink that stays inside is fine
    (tmp_path / "data" / "key").unlink()
    (tmp_path / "data" / "key").symlink_to(tmp_path / "f")
    assert load_recipe(write(MINIMAL + "validate:\n  inputs: [data]\n")).validate.inputs == (
        tmp_path / "data",)


def test_validate_inputs_names_on_the_input_disk(write: Write, tmp_path: Path) -> None:
    """Each input lands on the disk under its own name: a clash is refused at its line."""
    files = {"a/data.csv": "1", "b/data.csv": "2", "vmbuild-input.json": "{}"}
    msg = error_of(write(MINIMAL + "validate:\n  inputs:\n    - a/data.csv\n    - b/data.csv\n",
                         **files))
    assert msg == ('recipe.yaml:8: validate.inputs[1]: "b/data.csv": another input '
                   '("a/data.csv") has the name "data.csv"; each input is put on the input '
                   "disk under its own name")
    msg = error_of(write(MINIMAL + "validate:\n  inputs: [vmbuild-input.json]\n"))
    assert msg.startswith('recipe.yaml:6: validate.inputs[0]: "vmbuild-input.json": '
                          "vmbuild-input.json is the name of the runner's own file"), msg
    # the same path twice (as lists append across extends) is one input
    r = load_recipe(write(MINIMAL + "validate:\n  inputs: [a/data.csv, ./a/data.csv]\n"))
    assert r.validate.inputs == (tmp_path / "a" / "data.csv",)


def test_validate_running_for_must_be_shorter_than_timeout(write: Write) -> None:
    started = MINIMAL + "validate:\n  until: started\n"
    assert error_of(write(started + "  running_for: 10m\n")) == (
        "recipe.yaml:7: validate.running_for: 10m is not shorter than validate.timeout (10m), "
        "which bounds the whole boot test; shorten it or raise validate.timeout")
    assert error_of(write(started + "  timeout: 20s\n")) == (
        "recipe.yaml:7: validate.timeout: 20s is not longer than validate.running_for (30s), "
        "so the boot test would time out before the job has run long enough; raise it or "
        "shorten validate.running_for")
    assert error_of(write(started + "  running_for: 2h\n  timeout: 1h30m\n")).startswith(
        "recipe.yaml:7: validate.running_for: 2h is not shorter than validate.timeout (1h30m)")
    r = load_recipe(write(started + "  running_for: 5m\n  timeout: 6m\n"))
    assert (r.validate.running_for, r.validate.timeout) == (300.0, 360.0)
    # with until: exit, running_for has no effect and is not held against the timeout
    r = load_recipe(write(MINIMAL + "validate:\n  running_for: 1h\n  timeout: 20s\n"))
    assert (r.validate.until, r.validate.running_for, r.validate.timeout) == (
        "exit", 3600.0, 20.0)


def test_nvme_needs_efi(write: Write) -> None:
    text = MINIMAL + "guest:\n  memory: 1GiB\noutput:\n  disk_controller: nvme\n"
    expected = ("recipe.yaml:8: output.disk_controller: nvme needs guest.firmware: efi "
                "(VMware's BIOS cannot boot from NVMe); set guest.firmware: efi, or use "
                "pvscsi, lsilogic or sata")
    assert error_of(write(text)) == expected  # bios is the default
    assert error_of(write(text.replace("memory: 1GiB", "firmware: bios"))) == expected
    r = load_recipe(write(text.replace("memory: 1GiB", "firmware: efi")))
    assert (r.output.disk_controller, r.guest.firmware) == ("nvme", "efi")
    # given in a base recipe: the error names the base's line
    write("version: 1\noutput:\n  disk_controller: nvme\n", name="base.yaml")
    assert error_of(write(MINIMAL + "extends: base.yaml\n")).startswith(
        "base.yaml:3: output.disk_controller: nvme needs guest.firmware: efi")
    r = load_recipe(write(MINIMAL + "extends: base.yaml\nguest: {firmware: efi}\n"))
    assert r.output.disk_controller == "nvme"


def test_init_job_refuses_what_needs_services(write: Write) -> None:
    """guest.init: job starts no service, so a recipe asking for one is told at the init's
    line, with every setting that needs systemd named."""
    r = load_recipe(write(MINIMAL + "guest:\n  init: job\n"))
    assert r.guest.init == "job"
    assert load_recipe(write(MINIMAL)).guest.init == "systemd"
    assert error_of(write(MINIMAL + "guest:\n  init: job\n  ssh: true\n")) == (
        "recipe.yaml:6: guest.init: job starts no services, but guest.ssh needs systemd's; "
        "use guest.init: systemd, or turn it off")
    text = MINIMAL + "guest:\n  init: job\n  vmware_tools: true\n"
    assert error_of(write(text.replace("command:", "network: true\n  command:"))) == (
        "recipe.yaml:7: guest.init: job starts no services, but job.network and "
        "guest.vmware_tools need systemd's; use guest.init: systemd, or turn them off")
    assert error_of(write(MINIMAL + "guest:\n  init: runit\n")).startswith(
        "recipe.yaml:6: guest.init:")
    # the init from a base recipe, the network from the child: the base's line is named
    write("version: 1\nguest:\n  init: job\n", name="base.yaml")
    assert error_of(write(MINIMAL.replace("command:", "network: true\n  command:")
                          + "extends: base.yaml\n")).startswith(
        "base.yaml:3: guest.init: job starts no services, but job.network needs")


def test_validate_extends_merge(write: Write, tmp_path: Path) -> None:
    base = """\
version: 1
guest:
  vmware_tools: true
validate:
  command: [/opt/base/selftest]
  inputs: [data/]
  environment: {A: base, B: base}
  expect: {exit: 0, output: "^base"}
  until: started
  running_for: 1m
"""
    child = """\
name: child
extends: common/base.yaml
validate:
  command: [/opt/child/selftest, --quick]
  inputs: [more.csv]
  environment: {B: child}
  expect: {output: "^child"}
job:
  command: x
"""
    path = write(child, **{"common/base.yaml": base, "common/data/x": "x", "more.csv": "1"})
    r = load_recipe(path)
    v = r.validate
    assert r.guest.vmware_tools is True
    assert v.command == ("/opt/child/selftest", "--quick")  # replaced, never appended
    # appended, base first, each resolved against the directory of the file that wrote it
    assert v.inputs == (tmp_path / "common" / "data", tmp_path / "more.csv")
    assert dict(v.environment) == {"A": "base", "B": "child"}
    assert v.expect == Expect(exit=0, output="^child")
    assert (v.until, v.running_for, v.timeout) == ("started", 60.0, 600.0)
    assert recipe_to_dict(r)["validate"]["inputs"] == ["common/data", "more.csv"]
    # null unsets the base's command: the validation boot runs job.command again
    r = load_recipe(write(child.replace("  command: [/opt/child/selftest, --quick]\n",
                                        "  command: null\n")))
    assert r.validate.command is None
    # a string command in the child replaces a list in the base
    r = load_recipe(write(child.replace("[/opt/child/selftest, --quick]", "make check")))
    assert r.validate.command == ("/bin/sh", "-c", "make check")


CLI_CASES = [
    ("validate:\n  timeout: 2 hours\n",
     'recipe.yaml:6: validate.timeout: "2 hours" is not a duration (use 90s, 30m, 2h)'),
    ("validate:\n  expect:\n    output: \"(\"\n",
     'recipe.yaml:7: validate.expect.output: "(" is not a valid Python regular expression: '
     "missing ), unterminated subpattern at position 0"),
    ("validate:\n  inputs: [../x]\n", 'recipe.yaml:6: validate.inputs[0]: "../x" leaves the '
     "recipe's directory"),
    ("output:\n  disk_controller: nvme\n",
     "recipe.yaml:6: output.disk_controller: nvme needs guest.firmware: efi"),
    ("validate:\n  until: started\n  running_for: 1h\n",
     "recipe.yaml:7: validate.running_for: 1h is not shorter than validate.timeout (10m)"),
    ("guest:\n  vmware_tools: 1\n",
     "recipe.yaml:6: guest.vmware_tools: expected a boolean (true or false), got an integer"),
]


def test_cli_check_refuses_bad_new_keys_with_exit_2(tmp_path: Path) -> None:
    """What a user sees from `vmbuild check`: one located line, exit 2, no traceback."""
    from tests.conftest import run_vmbuild

    good = tmp_path / "good"
    (good / "testdata").mkdir(parents=True)
    (good / "testdata" / "n.txt").write_text("1 2 3\n")
    (good / "recipe.yaml").write_text(MINIMAL + VALIDATE_FULL.replace(", extra.csv", ""))
    proc = run_vmbuild("check", "--json", "recipe.yaml", cwd=good, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["validate"]["inputs"] == ["testdata"]
    for i, (snippet, expected) in enumerate(CLI_CASES):
        case = tmp_path / f"case{i}"
        case.mkdir()
        (case / "recipe.yaml").write_text(MINIMAL + snippet)
        proc = run_vmbuild("check", "recipe.yaml", cwd=case, timeout=60)
        assert proc.returncode == 2, (snippet, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, proc.stderr)


def test_format_duration() -> None:
    from vmbuild.recipe import format_duration

    assert [format_duration(s) for s in (30, 600, 5400, 86400 + 60, 2.5, 7200.0)] == [
        "30s", "10m", "1h30m", "1d1m", "2.5s", "2h"]
    for text in ("90s", "30m", "1h30m", "2d"):
        assert format_duration(parse_duration(text)) in (text, "1m30s")


# Found by the recipe fuzzer (tests/test_recipe_fuzz.py) -------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("!!bool maybe", '"maybe" is not a valid !!bool value'),
    ("!!int abc", '"abc" is not a valid !!int value'),
    ("!!float x", '"x" is not a valid !!float value'),
    ("!!timestamp nope", '"nope" is not a valid !!timestamp value'),
    ("2024-02-30", '"2024-02-30" is not a valid !!timestamp value'),  # implicit: a bad date
])
def test_a_scalar_its_tag_cannot_read_is_a_located_error(write: Write, value: str,
                                                         message: str) -> None:
    """PyYAML's constructors raised KeyError/ValueError/AttributeError for these: a
    traceback instead of exit 2. The value may also be a key (`2024-02-30: x`)."""
    path = write(MINIMAL + f"guest:\n  hostname: {value}\n")
    assert error_of(path) == f"recipe.yaml:6: guest.hostname: {message}"
    path = write(MINIMAL + f"{value}: x\n")
    assert error_of(path) == f"recipe.yaml:5: {message}"


def test_a_lone_surrogate_in_a_value_is_a_located_error(write: Write) -> None:
    """A YAML escape can make a lone surrogate ("\\ud800", or a JSON-style pair, which YAML
    reads as two); it cannot be encoded as UTF-8, and a path holding one crashed the
    loader in os.path.realpath (UnicodeEncodeError)."""
    path = write(MINIMAL + 'validate:\n  inputs: ["\\ud83d\\ude00"]\n', app="x")
    assert error_of(path) == (
        "recipe.yaml:6: validate.inputs[0]: contains a lone surrogate (\\ud83d), which is not "
        "a character and cannot be written as UTF-8 into a path, an argument or a file")
    path = write(MINIMAL.replace("command: echo hello from the guest",
                                 'command: "echo \\udfff hello"'))
    assert error_of(path).startswith("recipe.yaml:4: job.command: contains a lone surrogate")
