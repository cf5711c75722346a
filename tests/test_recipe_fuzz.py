"""Recipe fuzzing: hostile mutations of a valid recipe never crash the loader or the CLI.

A recipe is input from a person (or from a generator that went wrong), so every way it can be
wrong must end in a located `RecipeError` (`file:line: field: message`, or `file: message`
for a whole-file problem) and, through `vmbuild check`, in exit status 2 with that message and
no traceback. Hypothesis mutates one valid recipe that uses every section: values replaced by
wrong types, unicode (lone surrogates and NUL through YAML escapes, RTL text, combining
marks, astral characters), huge and negative numbers, deep nesting, anchors, aliases and
merge keys (`<<: *x`), duplicate and non-string keys, unsupported tags, very long strings;
then the text itself: BOMs, tabs, NUL and binary bytes, CRLF, truncation, a second document.

The recipe is emitted by a small emitter of our own (not yaml.dump) so that duplicate keys,
anchors, aliases and raw YAML snippets can be written at all.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import run_vmbuild
from vmbuild.errors import RecipeError
from vmbuild.recipe import load_recipe


@dataclass(frozen=True)
class Raw:
    """YAML text written verbatim (one line, flow style): tags, aliases, odd scalars."""

    text: str


@dataclass(frozen=True)
class Anchored:
    """A value written with an anchor `&name`, so that aliases elsewhere can refer to it."""

    name: str
    value: Any


@dataclass(frozen=True)
class Map:
    """A mapping as written: a list of pairs, so a key can be given twice."""

    pairs: tuple[tuple[Any, Any], ...]


def as_tree(value: Any) -> Any:
    """Plain dicts to `Map`s (recursively), so the mutators deal with one mapping type."""
    if isinstance(value, dict):
        return Map(tuple((k, as_tree(v)) for k, v in value.items()))
    if isinstance(value, list):
        return [as_tree(v) for v in value]
    return value


# A valid recipe touching every section; app/ is created beside it (files and inputs).
VALID = as_tree({
    "version": 1,
    "name": "fuzz",
    "guest": {"release": "bookworm", "packages": ["jq", "gawk"], "memory": "512MiB",
              "disk": "4GiB", "cpus": 2, "hostname": "fuzz-vm", "timezone": "Europe/Berlin",
              "ssh": False, "firmware": "bios", "mirror": "http://deb.debian.org/debian"},
    "application": {"files": [{"src": "app/", "dest": "/opt/fuzz/", "mode": "0755",
                               "owner": "root"}],
                    "run": ["true"]},
    "job": {"command": ["/opt/fuzz/run", "--all"], "user": "app", "workdir": "/opt/fuzz",
            "environment": {"GREETING": "hello", "PORT": 8080}, "timeout": "30m",
            "network": False, "outputs": "/var/lib/job/output"},
    "output": {"hardware_version": 19, "disk_controller": "pvscsi", "nic": "vmxnet3",
               "vmdk": "streamOptimized", "formats": ["vmx"]},
    "validate": {"inputs": ["app/"], "environment": {"SMOKE": "1"},
                 "expect": {"exit": 0, "output": "^ok$"}, "until": "exit", "timeout": "10m"},
})


# Emitting ------------------------------------------------------------------------------------

def scalar_text(value: Any, ascii_only: bool) -> str:
    """One scalar as YAML text. Strings are JSON-quoted (a YAML double-quoted scalar), so
    escapes carry what a file cannot: lone surrogates, NUL, other control characters."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return json.dumps(value, ensure_ascii=ascii_only or has_surrogate)
    raise TypeError(value)


def flow(value: Any, ascii_only: bool) -> str:
    """A value in flow style, on one line (used inside lists and for small containers)."""
    if isinstance(value, Anchored):
        return f"&{value.name} {flow(value.value, ascii_only)}"
    if isinstance(value, Map):
        inner = ", ".join(f"{flow(k, ascii_only)}: {flow(v, ascii_only)}" for k, v in value.pairs)
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v, ascii_only) for v in value) + "]"
    return scalar_text(value, ascii_only)


def emit(tree: Map, ascii_only: bool) -> str:
    """The recipe in block style for mappings (so errors have distinct lines), flow inside."""
    lines: list[str] = []

    def block(mapping: Map, indent: int) -> None:
        for key, value in mapping.pairs:
            prefix = " " * indent + flow(key, ascii_only) + ":"
            anchor = ""
            if isinstance(value, Anchored) and isinstance(value.value, Map) and value.value.pairs:
                anchor, value = f" &{value.name}", value.value
            if isinstance(value, Map) and value.pairs:
                lines.append(prefix + anchor)
                block(value, indent + 2)
            else:
                lines.append(f"{prefix}{anchor} {flow(value, ascii_only)}")

    block(tree, 0)
    return "\n".join(lines) + "\n"


# Mutating ------------------------------------------------------------------------------------

Path_ = tuple[Any, ...]  # indexes into nested Maps (pair index) and lists (item index)


def containers(tree: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every mapping and list in the tree, with its path."""
    if isinstance(tree, Map):
        yield path, tree
        for i, (_, v) in enumerate(tree.pairs):
            yield from containers(v, (*path, i))
    elif isinstance(tree, list):
        yield path, tree
        for i, v in enumerate(tree):
            yield from containers(v, (*path, i))


def replace_at(tree: Any, path: Path_, fn: Any) -> Any:
    """A copy of `tree` with the node at `path` replaced by fn(node)."""
    if not path:
        return fn(tree)
    head, rest = path[0], path[1:]
    if isinstance(tree, Map):
        pairs = list(tree.pairs)
        key, value = pairs[head]
        pairs[head] = (key, replace_at(value, rest, fn))
        return Map(tuple(pairs))
    items = list(tree)
    items[head] = replace_at(items[head], rest, fn)
    return items


WEIRD_TEXT = [
    "",
    " ",
    "\u202eevil\u202c",                   # RTL override
    "\u05e9\u05dc\u05d5\u05dd",            # Hebrew
    "e\u0301\u0327\u0308",                 # combining marks
    "\U0001f600\U00010000",                # astral plane
    "\ud800", "\udfff", "a\udc80b",        # lone surrogates (YAML escapes allow them)
    "\x00", "a\x00b",                      # NUL
    "\x07\x1b[31m", "\t", "line\nbreak", "\r\n", "\u2028\u2029", "\x85",
    "\ufeff", "\ufffe", "\uffff",
    "../../etc/passwd", "/etc/shadow", "app/../../x", "~root", "$(reboot)", "`id`",
    "%s%n{0}", "{{ lookup('pipe', 'id') }}", "-1", "1e999", "0x10", "0o17", "1:30",
    "NaN", "yes", "on", "null", "~", "0755", "999999999999999999999GiB", "-5GiB", "1.5.3MiB",
    "1e3s", "-1h", "0s", "99999999999999999999999h", "12ns", "[", "*", "&", "!", "|",
]

WEIRD_RAW = [
    "*nosuch",                       # an alias to an anchor that was never defined
    "!!binary aGVsbG8=", "!!binary ####", "!!timestamp 2001-12-14", "!!set {a, b}",
    "!!omap [{a: 1}]", "!!python/object:os.system {}", "!custom x", "!!int abc",
    "!!float x", "!!str", "!!null", "!!bool maybe", "!!timestamp nope", "!!timestamp 2024-13-01",
    "!!map []", "!!seq {}",
    "2001-12-14t21:59:43.10-05:00", "2024-02-30", "0b1010", "0x_ff", "1_000_000", "190:20:30",
    ".inf", "-.inf", ".nan", "0o777", "0777", "+12", "-0", "1e-400", "1e400",
    "'single ''quoted'''", "\"\\x00\"", "\"\\ud800\"", "\"\\U0010ffff\"", "\"\\uDFFF\\uD800\"",
    "? complex", "{? [a]: b}", "[[[[[[[[[[]]]]]]]]]]", "{a: {b: {c: {d: {}}}}}",
    "&x [*x]", "&y {k: *y}", "{<<: 1}", "{<<: [1, 2]}", "{<<: *nosuch}",
    "|\n  literal", ">-\n  folded",
]


def deep(depth: int, kind: str) -> Raw:
    """A value nested `depth` levels deep (lists, mappings, or both), as flow-style text
    (written out directly: the emitter itself would recurse as deep)."""
    opens, closes = [], []
    for i in range(depth):
        as_list = kind == "list" or (kind == "mixed" and i % 2 == 1)
        opens.append("[" if as_list else "{k: ")
        closes.append("]" if as_list else "}")
    return Raw("".join(opens) + "leaf" + "".join(reversed(closes)))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**100, -(10**100), 0, -1, 256, 65, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WEIRD_TEXT),
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.text(alphabet="ab \t\x00\\\"'#:{}[],&*!|>%@`-?", max_size=20),
    st.sampled_from(["x" * 10_000, "é" * 5_000, "a\n" * 2_000, "/" + "a/" * 3_000]),
    st.builds(Raw, st.sampled_from(WEIRD_RAW)),
)

keys = st.one_of(
    st.sampled_from(["version", "name", "guest", "job", "extends", "memory", "src", "unknown",
                     "Version", "job ", "\u202ejob", "GREETING", "1BAD", "A-B", "<<"]),
    st.text(max_size=12),
    st.integers(),
    st.booleans(),
    st.none(),
    st.builds(Raw, st.sampled_from(["<<", "? [a, b]", "!!binary aGk=", "*nosuch", "2001-01-01",
                                    "1.5", "[x]", "{a: 1}", "\"a\\u0000b\""])),
)


def values(depth: int = 2) -> st.SearchStrategy[Any]:
    """Any value: a scalar, or small lists and mappings of them, or something very deep."""
    if depth == 0:
        return scalars
    inner = values(depth - 1)
    return st.one_of(
        scalars,
        st.builds(Raw, st.sampled_from(WEIRD_RAW)),
        st.lists(inner, max_size=4),
        st.lists(st.tuples(keys, inner), max_size=4).map(lambda p: Map(tuple(p))),
        st.builds(deep, st.sampled_from([1, 50, 200, 1000, 5000]),
                  st.sampled_from(["list", "map", "mixed"])),
    )


@st.composite
def mutated_tree(draw: st.DrawFn) -> Map:
    """The valid recipe with one to four structural mutations."""
    tree: Any = VALID
    anchors = 0
    for _ in range(draw(st.integers(1, 4))):
        spots = list(containers(tree))
        path, node = draw(st.sampled_from(spots))
        op = draw(st.sampled_from(["replace", "add", "duplicate", "delete", "anchor-alias",
                                   "merge"]))
        size = len(node.pairs) if isinstance(node, Map) else len(node)
        if op == "replace" and size:
            i = draw(st.integers(0, size - 1))
            tree = replace_at(tree, (*path, i), lambda _old: draw(values()))
        elif op == "add":
            if isinstance(node, Map):
                pair = (draw(keys), draw(values()))
                tree = replace_at(tree, path, lambda m, pair=pair: Map((*m.pairs, pair)))
            else:
                item = draw(values())
                tree = replace_at(tree, path, lambda xs, item=item: [*xs, item])
        elif op == "duplicate" and size and isinstance(node, Map):
            i = draw(st.integers(0, size - 1))
            key = node.pairs[i][0]
            dup = (key, draw(st.one_of(st.just(node.pairs[i][1]), values(1))))
            tree = replace_at(tree, path, lambda m, dup=dup: Map((*m.pairs, dup)))
        elif op == "delete" and size:
            i = draw(st.integers(0, size - 1))
            if isinstance(node, Map):
                tree = replace_at(tree, path, lambda m, i=i: Map(m.pairs[:i] + m.pairs[i + 1:]))
            else:
                tree = replace_at(tree, path, lambda xs, i=i: xs[:i] + xs[i + 1:])
        elif op in ("anchor-alias", "merge") and size:
            # anchor one value, then refer to it (or merge it) somewhere later in the file
            # the alias goes after the anchor in the file (an earlier one is only a syntax
            # error, which other mutations reach anyway): appended to a container whose new
            # last item comes later in document order, i.e. sorts after the anchored path
            i = draw(st.integers(0, size - 1))
            name = f"a{anchors}"
            anchors += 1
            anchored = (*path, i)
            tree = replace_at(tree, anchored, lambda old, name=name: Anchored(name, old))
            spots = [(p, c) for p, c in containers(tree)
                     if (*p, len(c.pairs) if isinstance(c, Map) else len(c)) > anchored]
            target_path, target = draw(st.sampled_from(spots))
            if isinstance(target, Map):
                key = "<<" if op == "merge" else draw(keys)
                ref: Any = Raw(f"*{name}")
                if op == "merge" and draw(st.booleans()):
                    ref = [Raw(f"*{name}"), Raw(f"*{name}")]
                pair = (Raw("<<") if key == "<<" else key, ref)
                tree = replace_at(tree, target_path, lambda m, pair=pair: Map((*m.pairs, pair)))
            else:
                tree = replace_at(tree, target_path, lambda xs, name=name: [*xs, Raw(f"*{name}")])
    assert isinstance(tree, Map)
    return tree


@st.composite
def recipe_bytes(draw: st.DrawFn) -> bytes:
    """A mutated recipe as file content, then mangled as text and bytes."""
    text = emit(draw(mutated_tree()), ascii_only=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["bom", "tab", "insert", "truncate", "crlf", "document",
                                   "indent", "none"]))
        if op == "bom":
            text = "\ufeff" + text
        elif op == "tab":
            spaces = [m.start() for m in re.finditer("  ", text)]
            if spaces:
                at = draw(st.sampled_from(spaces))
                text = text[:at] + "\t" + text[at + 2:]
        elif op == "insert":
            at = draw(st.integers(0, len(text)))
            junk = draw(st.one_of(st.text(max_size=8),
                                  st.sampled_from(["\x00", "\ufeff", "\t", ":", "- ", "\n  ",
                                                   "&z ", "*z", "<<: *z\n", "%YAML 1.1\n",
                                                   "---\n", "...\n", "\x1b", "\ud800"])))
            text = text[:at] + junk + text[at:]
        elif op == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif op == "crlf":
            text = text.replace("\n", "\r\n")
        elif op == "document":
            text += draw(st.sampled_from(["---\nname: other\n", "...\n", "--- !!str x\n"]))
        elif op == "indent":
            text = "\n".join("   " + line for line in text.split("\n"))
    data = text.encode("utf-8", "surrogatepass")  # a raw surrogate: invalid UTF-8 on disk
    if draw(st.integers(0, 3)):  # binary garbage in one case of four: it rarely gets past
        return data              # the UTF-8 check, so more would only test that check
    at = draw(st.integers(0, len(data)))
    garbage = draw(st.one_of(st.binary(max_size=16),
                             st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf", b"\x00\x00",
                                              b"\xc3", b"\xed\xa0\x80", b"\x80" * 4])))
    how = draw(st.sampled_from(["insert", "cut", "utf-16"]))
    if how == "insert":
        return data[:at] + garbage + data[at:]
    if how == "utf-16":  # a whole file in another encoding (with its BOM)
        return text.encode("utf-16", "surrogatepass")
    return data[:at] + garbage


# Checking ------------------------------------------------------------------------------------

LOCATED = re.compile(r"^(?P<file>[^\n]+?)(?::(?P<line>\d+))?: \S")


def workdir() -> Path:
    """A directory with the files the valid recipe names (app/), shared by all examples."""
    directory = Path(tempfile.mkdtemp(prefix="vmbuild-fuzz-"))
    (directory / "app").mkdir()
    (directory / "app" / "run").write_text("#!/bin/sh\necho ok\n")
    return directory


@pytest.fixture(scope="module")
def recipe_dir() -> Path:
    return workdir()


def check_loaded(path: Path, data: bytes) -> RecipeError | None:
    """Load `path`; any outcome but success or a located RecipeError fails the test."""
    try:
        load_recipe(path)
    except RecipeError as exc:
        message = str(exc)
        match = LOCATED.match(message)
        assert match, f"not located: {message!r}"
        assert "\n" not in message, f"an error must stay on one line: {message!r}"
        assert message.startswith(f"{exc.file}:"), message
        if exc.file == str(path) and exc.line is not None:
            lines = max(data.count(b"\n") + 1, data.count(b"\r") + 1)
            assert 1 <= exc.line <= lines, f"line {exc.line} of a {lines}-line file: {message!r}"
        return exc
    return None


def test_the_unmutated_recipe_is_valid(recipe_dir: Path) -> None:
    """The fuzzer starts from a recipe that loads: mutations, not the seed, make errors."""
    path = recipe_dir / "valid.yaml"
    data = emit(VALID, ascii_only=False).encode()
    path.write_bytes(data)
    assert check_loaded(path, data) is None
    assert load_recipe(path).job.environment == {"GREETING": "hello", "PORT": "8080"}


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=recipe_bytes())
def test_a_mutated_recipe_loads_or_fails_located(recipe_dir: Path, data: bytes) -> None:
    """Whatever the mutation, load_recipe returns a recipe or raises a located RecipeError."""
    path = recipe_dir / "recipe.yaml"
    path.write_bytes(data)
    check_loaded(path, data)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=recipe_bytes())
def test_vmbuild_check_exits_2_with_the_located_message(recipe_dir: Path, data: bytes) -> None:
    """Through the CLI: exit 0 for a valid recipe, else exit 2 with the very message
    load_recipe gives, on stderr, and never a traceback."""
    path = recipe_dir / "cli.yaml"
    path.write_bytes(data)
    error = check_loaded(path, data)
    proc = run_vmbuild("check", "cli.yaml", cwd=recipe_dir, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    if error is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("vmbuild: error: cli.yaml"), first
    assert LOCATED.match(first.removeprefix("vmbuild: error: ")), first
