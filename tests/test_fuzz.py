"""Bad input, fuzzed: every bad command line, `--set`, YAML config and JSONL line is
one `error: ...` line on stderr with exit code 2, never a traceback, never a hang.
An over-long sample is the one exception: it is skipped and listed, exit 0.

Hypothesis drives the in-process layer at scale: `run_cli` calls the real
`autotune.cli.run_main(probe.main | train.main, argv)`, exactly what `python probe.py`
and `python train.py` run, with a strict UTF-8 stdout and a backslashreplace stderr
as a real process has. A dozen representative inputs then run as real subprocesses.
The security items ride along: YAML is read with `safe_load` only and config values
are never evaluated, so a `!!python/object/apply:os.system` tag or an
`__import__('os').system(...)` value is an error and the marker file never appears.

The last test prints the tally (`fuzz: N bad inputs, ...`); run the whole file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import types
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import probe  # noqa: E402  (the repository root's probe.py)
import train  # noqa: E402
from autotune.cli import run_main  # noqa: E402
from autotune.config import Config  # noqa: E402
from autotune.hardware import known_cc  # noqa: E402

# Hundreds of inputs and a dozen real processes: the slow tier (`-m slow`).
pytestmark = pytest.mark.slow

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])

TALLY: Counter[str] = Counter()       # inputs, one_line, tracebacks, skipped_ok, subprocess
CATEGORY: Counter[str] = Counter()    # bad inputs per category


# ------------------------------------------------------------------ runner ---

@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_cli(main, argv: list[str]) -> Outcome:
    """`python probe.py ARGV` / `python train.py ARGV`, in this process: the real `run_main`,
    a strict UTF-8 stdout and a backslashreplace stderr (what Python gives a real process
    with PYTHONIOENCODING=utf-8). Any exception other than SystemExit is the traceback a
    user would see: it is counted and re-raised."""
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    code: object = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            TALLY["tracebacks"] += 1
            raise
    out.flush()
    err.flush()
    code = 0 if code is None else code if isinstance(code, int) else 1
    return Outcome(code, out_bytes.getvalue().decode("utf-8", "surrogateescape"),
                   err_bytes.getvalue().decode("utf-8", "surrogateescape"))


def assert_one_line_error(outcome: Outcome, category: str, what: object) -> None:
    TALLY["inputs"] += 1
    CATEGORY[category] += 1
    context = f"{category}: {what!r}\nexit {outcome.code}\nstderr: {outcome.stderr!r}\nstdout: {outcome.stdout[:300]!r}"
    assert "Traceback" not in outcome.stderr, context
    assert outcome.code == 2, context
    # One error line, then (for a list of problems) one line per problem; no carriage return
    # that would redraw a line.
    lines = outcome.stderr.split("\n")
    assert outcome.stderr.startswith("error: ") and outcome.stderr.endswith("\n"), context
    assert all(line.startswith(("  - ", "  ... and ")) for line in lines[1:-1]), context
    assert "\r" not in outcome.stderr, context
    assert outcome.stdout == "", context
    TALLY["one_line"] += 1


# ----------------------------------------------------------------- fixtures ---

@pytest.fixture(scope="module", autouse=True)
def no_gpu():
    """The answer must not depend on the machine: hide every GPU from the probe."""
    # COLUMNS: rich must not wrap a long path in the `--check-data` table.
    old = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "COLUMNS")}
    os.environ.update(CUDA_VISIBLE_DEVICES="", COLUMNS="400")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def marker(work) -> Path:
    """The file every code-execution attempt tries to create; it must never exist."""
    path = work / "PWNED"
    yield path
    assert not path.exists(), "a config value or YAML tag was executed"


@pytest.fixture(scope="module")
def data_dir(work) -> Path:
    folder = work / "good-data"
    folder.mkdir()
    lines = [{"text": "hello there", "code": [1, 2, 3]}, {"text": "東京", "code": [4, 5]},
             {"text": "مرحبا", "code": [6, 7, 8]}]
    (folder / "train.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    return folder


def tag_payloads(marker: Path) -> list[str]:
    cmd = json.dumps(f"touch {marker}")
    return [f"!!python/object/apply:os.system [{cmd}]",
            f"!!python/object/apply:subprocess.check_call [[touch, {json.dumps(str(marker))}]]",
            f"!!python/object/new:os.system [{cmd}]",
            "!!python/name:os.system",
            "!!python/module:os"]


def code_payloads(marker: Path) -> list[str]:
    return [f"__import__('os').system('touch {marker}')",
            f"eval(\"__import__('os').system('touch {marker}')\")",
            f"$(touch {marker})",
            f"`touch {marker}`",
            "{{ __import__('os') }}",
            "lambda: 1"]


# ---------------------------------------------------------- the schema ---

@dataclass(frozen=True)
class Field:
    key: str               # dotted, e.g. training.learning_rate
    kind: str              # int | float | bool | str | literal | list | dict
    optional: bool
    options: tuple = ()
    gt: object = None
    ge: object = None
    lt: object = None
    le: object = None


def schema() -> list[Field]:
    fields = []
    for section, info in Config.model_fields.items():
        model = info.annotation
        entries = (model.model_fields.items() if isinstance(model, type) and issubclass(model, BaseModel)
                   else [(None, info)])
        for name, f in entries:
            ann, optional = f.annotation, False
            if typing.get_origin(ann) in (typing.Union, types.UnionType):
                args = [a for a in typing.get_args(ann) if a is not type(None)]
                optional, ann = True, args[0]
            origin = typing.get_origin(ann)
            kind = ("literal" if origin is typing.Literal else "list" if origin is list else
                    "dict" if origin is dict else ann.__name__)
            bounds = {b: getattr(m, b) for m in f.metadata for b in ("gt", "ge", "lt", "le") if hasattr(m, b)}
            fields.append(Field(f"{section}.{name}" if name else section, kind, optional,
                                typing.get_args(ann) if kind == "literal" else (), **bounds))
    return fields


FIELDS = schema()
SECTIONS = [k for k, f in Config.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
KNOWN_KEYS = {f.key for f in FIELDS} | set(SECTIONS) | {"training.evaluation_strategy"}
assert {f.kind for f in FIELDS} == {"int", "float", "bool", "str", "literal", "list", "dict"}, FIELDS

BOOL_WORDS = {"0", "1", "true", "false", "t", "f", "yes", "no", "y", "n", "on", "off"}
INT64 = 2**63


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _numeric(text: str) -> bool:
    try:
        float(text.strip())
        return True
    except ValueError:
        return False


# Text a user might type or paste: any code point but lone surrogates (they are their own case).
odd_char = st.one_of(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                     st.sampled_from("\u200f\u202e\u200b\ufeff\x00\u2028é東😀\u0301"))
junk_text = st.one_of(
    st.sampled_from(["abc", "yes please", "1.2.3", "0x", "--", "∞", "\u202eRTL\u202c", "東京", "1,5", "one",
                     "\u200f", "NaN?", "5e", "e5", "1e", "[]x", "null pointer", "\x00", "١٢"]),
    st.text(odd_char, min_size=1, max_size=12),
).filter(lambda s: s.strip() and not _numeric(s) and s.strip().lower() not in BOOL_WORDS)
huge_int = st.one_of(st.integers(min_value=INT64), st.integers(max_value=-INT64 - 1),
                     st.sampled_from([2**70, -(2**70), 10**30]))
fraction = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(
    lambda x: x != int(x))
nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf"), "1e400", "-1e999", "nan", "inf", "-Infinity"])
containers = st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=3), st.just({"a": 1}),
                       st.just([[1]]), st.just({"nested": {"deeper": [1.5]}}))


def bad_value(field: Field):
    """Python values that `field` must refuse, by its type and bounds."""
    not_null = [] if field.optional else [st.none()]
    if field.kind in ("int", "float"):
        choices = [junk_text, nonfinite, containers, st.booleans(), st.just(""), *not_null]
        if field.kind == "int":
            choices += [fraction, huge_int]
            lo, hi = -INT64, INT64 - 1
            if field.gt is not None:
                choices.append(st.integers(min_value=lo, max_value=field.gt))
            if field.ge is not None:
                choices.append(st.integers(min_value=lo, max_value=field.ge - 1))
            if field.lt is not None:
                choices.append(st.integers(min_value=field.lt, max_value=hi))
            if field.le is not None:
                choices.append(st.integers(min_value=field.le + 1, max_value=hi))
        else:
            if field.gt is not None:
                choices.append(st.floats(max_value=field.gt, min_value=-1e300))
            if field.ge is not None:
                choices.append(st.floats(max_value=field.ge, exclude_max=True, min_value=-1e300))
            if field.lt is not None:
                choices.append(st.floats(min_value=field.lt, max_value=1e300))
            if field.le is not None:
                choices.append(st.floats(min_value=field.le, exclude_min=True, max_value=1e300))
        return st.one_of(choices)
    if field.kind == "bool":
        return st.one_of(junk_text, st.sampled_from([2, -1, 0.5, 17, float("nan"), "2", "maybe", "nope"]),
                         containers, *not_null)
    if field.kind == "literal":
        return st.one_of(junk_text.filter(lambda s: s not in field.options),
                         st.sampled_from([s.upper() + " " for s in field.options]),
                         st.integers(), fraction, containers, *not_null)
    if field.kind == "str":
        return st.one_of(st.integers(), fraction, st.booleans(), containers, *not_null)
    if field.kind == "list":
        return st.one_of(st.integers(), fraction, st.booleans(), st.none(), st.just({"a": "b"}),
                         st.lists(st.integers(), min_size=1, max_size=3), st.just([["q_proj"]]), st.just([None]),
                         st.just([]) if field.key == "lora.target_modules" else st.just([1.5]))
    assert field.kind == "dict"
    return st.one_of(st.integers(), junk_text, st.lists(st.integers(), max_size=2), st.booleans(), fraction)


def to_flow(value) -> str:
    """A Python value as the one-line YAML a user would type after `--set key=`."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=2**30)
    return text.removesuffix("\n...\n").rstrip("\n")


typed_bad = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f.key), bad_value(f)))
name_text = st.text(odd_char, min_size=1, max_size=10).filter(lambda s: "=" not in s and "." not in s and s.strip())
unknown_key = st.one_of(
    st.tuples(st.sampled_from(SECTIONS), name_text).map(lambda t: f"{t[0]}.{t[1]}"),
    name_text,
    st.sampled_from(["lora.rank", "lora.alpha", "training.lr", "training.evaluationstrategy", "Training.seed",
                     "model.name", "data.maxlength", "samples", "autotune.vram", "lora.r.x", "training.bf16.on"]),
    st.tuples(st.sampled_from([f.key for f in FIELDS if f.kind != "dict"]), name_text)
    .map(lambda t: f"{t[0]}.{t[1]}"),   # a leaf used as a section; never under lr_scheduler_kwargs (a free dict)
).filter(lambda k: k.strip() not in KNOWN_KEYS)
section_scalar = st.tuples(st.sampled_from(SECTIONS), st.one_of(st.integers(), junk_text, st.just([1]), st.none()))


def nested(depth: int, brackets: str = "[]") -> str:
    return brackets[0] * depth + "1" + brackets[1] * depth


def billion_laughs_flow(levels: int) -> str:
    parts = ["a0: &a0 [1,1,1,1,1,1,1,1,1,1]"]
    for i in range(1, levels):
        parts.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    return "{" + ", ".join(parts) + "}"


def raw_set_items(marker: Path):
    """`--set` strings that are wrong as text: syntax, YAML, tags, code, nesting, Unicode."""
    numeric_keys = [f.key for f in FIELDS if f.kind in ("int", "float")]
    free_dict = "training.lr_scheduler_kwargs"
    return st.one_of(
        junk_text.filter(lambda s: "=" not in s),                                        # no `=`
        st.sampled_from(["=5", " =5", "=", "lora.r", "", " = "]),
        st.tuples(st.sampled_from(numeric_keys),
                  st.sampled_from(["[1", "{a: 1", "'open", '"open', "*undefined", "&a [*a]", "!!int x",
                                   "!!float x", "!!bool x", "!!timestamp x", "2024-13-01", "9" * 5000,
                                   '"\\ud800"', '"a\\udfffb"', "\x00", "@x", "`x", "%x", "a: b: c",
                                   "- - -", "!!binary @@@", "?"]
                                  + tag_payloads(marker) + code_payloads(marker)))
        .map(lambda t: f"{t[0]}={t[1]}"),
        st.integers(60, 3000).map(lambda n: f"{free_dict}={nested(n, '{}').replace('{', '{a: ')}"),
        st.integers(60, 3000).map(lambda n: f"training.report_to={nested(n)}"),
        st.integers(6, 8).map(lambda n: f"{free_dict}={billion_laughs_flow(n)}"),
        st.sampled_from(["samples.reference_text=\"\\ud800\"", "model.name_or_path=\"x\\udfff\"",
                         "lora.target_modules=[\"q_proj\", \"\\udb80\"]", f"{free_dict}={{a: \"\\ud834\"}}"]),
    )


def set_items(marker: Path):
    typed = st.one_of(typed_bad, st.tuples(unknown_key, st.one_of(st.integers(), junk_text)), section_scalar)
    return st.one_of(typed.map(lambda kv: f"{kv[0]}={to_flow(kv[1])}"), raw_set_items(marker))


# ------------------------------------------------------------- command lines ---

# What a real argv can hold: no NUL, and undecodable bytes only as surrogate escapes.
argv_text = st.text(st.one_of(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                              st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)), min_size=1, max_size=12)
not_float = argv_text.filter(lambda s: not _numeric(s))
RTX = ["--gpu", "RTX 4090"]


def probe_bad_groups(marker: Path, bad_yaml: Path, folder: Path):
    cc_like = st.one_of(argv_text, st.sampled_from(["8", "8.6.1", "8,6", "v8.6", "-8.6", "٨.٦", "1000.0", "8.",
                                                    ".6", "8.6a", "9" * 30 + ".0", "nan", "8 .6"]))
    return st.one_of(
        argv_text.map(lambda s: ["--zz" + s]),                                       # unknown flag
        argv_text.filter(lambda s: not s.startswith("-")).map(lambda s: [s]),         # stray positional
        st.sampled_from([["--vram"], ["--cc"], ["--gpu"], ["--count"], ["--config"], ["--set"], ["-x"],
                         ["--json=yes"], ["--vram", "24", "--cc"]]),                     # missing value
        argv_text.filter(lambda s: not _is_int(s)).map(lambda s: [*RTX, "--vram", "24", "--count", s]),
        st.one_of(st.integers(max_value=0), st.integers(min_value=1025, max_value=10**12))
        .map(lambda n: [*RTX, "--vram", "24", "--count", str(n)]),
        st.one_of(not_float, st.sampled_from(["nan", "inf", "-inf", "1e400", "1e300", "0", "-0", "-24", "1e-12",
                                              "0x18", "24GB", "", " "]))
        .map(lambda v: [*RTX, "--vram", v]),
        cc_like.filter(lambda s: not re.fullmatch(r"\s*[0-9]{1,3}\.[0-9]{1,3}\s*", s))
        .map(lambda c: [*RTX, "--vram", "24", "--cc", c]),
        st.sampled_from([["--cc", "8.6"], ["--gpu", "RTX 4090"], ["--gpu", "x", "--cc", "8.0"]]),  # no --vram
        argv_text.filter(lambda s: known_cc(s) is None and not s.startswith("-"))
        .map(lambda name: ["--gpu", name, "--vram", "24"]),                             # cannot guess the cc
        st.sampled_from([["--gpu", "   ", "--vram", "8", "--cc", "8.0"]]),
        st.sampled_from([["--config", str(folder / "missing.yaml")], ["--config", str(folder)],
                         ["--config", str(bad_yaml)], ["--config", "x" * 5000]]),
        st.lists(set_items(marker), min_size=1, max_size=3).map(lambda items: [a for i in items for a in ("--set", i)]),
    )


def shuffled_argv(groups: list[list[str]], extras: list[list[str]]):
    return st.permutations(groups + extras).map(lambda gs: [a for g in gs for a in g])


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_probe_command_line(data, work, marker):
    bad_yaml = work / "bad.yaml"
    bad_yaml.write_text("training:\n  bf16: [true\n", encoding="utf-8")
    group = data.draw(probe_bad_groups(marker, bad_yaml, work), label="bad")
    extras = data.draw(st.lists(st.sampled_from([["--json"]]), max_size=1, unique_by=tuple), label="extras")
    # A flag missing its value goes last, or the next flag would be read as its value.
    argv = (data.draw(shuffled_argv([], extras)) + group) if len(group) == 1 else data.draw(shuffled_argv([group], extras))
    assert_one_line_error(run_cli(probe.main, argv), "probe.py arguments", argv)
    assert not marker.exists()


@settings(FUZZ, max_examples=150)
@given(items=st.data())
def test_set_values(items, marker):
    sets = items.draw(st.lists(set_items(marker), min_size=1, max_size=3), label="sets")
    extra = items.draw(st.sampled_from([[], ["--json"], [*RTX, "--vram", "24"], ["--gpu", "V100", "--vram", "16"]]))
    argv = extra + [a for s in sets for a in ("--set", s)]
    assert_one_line_error(run_cli(probe.main, argv), "--set values", sets)
    assert not marker.exists()


# ------------------------------------------------ the guide's bare keys ---

def _every_field() -> list[str]:
    return [name for section in Config.model_fields.values()
            if isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel)
            for name in section.annotation.model_fields]


bare_key = st.one_of(st.sampled_from(_every_field()),
                     st.sampled_from(_every_field()).map(lambda k: k[:-1] or k),       # a typo
                     st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True))
bare_value = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                       st.sampled_from(["adamw_torch_fused", "20-30", "30-20", "5e-5", "none", "steps", "[q_proj]",
                                        "{a: 1}", ""]))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_bare_keys_as_the_guide_writes_them(data, work, marker):
    """A top-level key in a file or a bare `--set key=value` (the guide's snippets): read in its
    section, or one line saying what is wrong; never a traceback."""
    key, value = data.draw(bare_key, label="key"), data.draw(bare_value, label="value")
    if data.draw(st.booleans(), label="as --set"):
        argv = ["--json", "--set", f"{key}={value}"]
    else:
        path = work / "bare.yaml"
        path.write_text(yaml.safe_dump({key: value}), encoding="utf-8")
        argv = ["--json", "--config", str(path)]
    outcome = run_cli(probe.main, argv)
    assert "Traceback" not in outcome.stderr
    if outcome.code == 0:
        TALLY["inputs"] += 1
        TALLY["accepted"] += 1
        CATEGORY["the guide's bare keys"] += 1
        config = json.loads(outcome.stdout)["config"]
        # Accepted: the value landed in exactly the section that has the key.
        homes = [section for section, fields in config.items() if isinstance(fields, dict) and key in fields]
        assert key in config or len(homes) == 1, (key, value, homes)
    else:
        assert_one_line_error(outcome, "the guide's bare keys", (key, value))


# --------------------------------------------------------------- YAML files ---

def yaml_docs(marker: Path):
    tags = tag_payloads(marker)

    def typed_doc(kv) -> bytes:
        key, value = kv
        tree: dict = {}
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode("utf-8")

    flow = "training: {report_to: [tensorboard, none], learning_rate: 5.0e-05, optim: adamw_torch}"
    start = len("training: {")
    raw = st.one_of(
        st.builds(lambda t: f"training:\n  learning_rate: {t}\n".encode(), st.sampled_from(tags + code_payloads(marker))),
        st.builds(lambda t: f"{t}\n".encode(), st.sampled_from(tags)),
        st.builds(lambda t: f"lora:\n  r: 8\n  target_modules: {t}\n".encode(), st.sampled_from(tags)),
        st.integers(start, len(flow) - 1).map(lambda k: flow[:k].encode()),                    # truncated flow
        st.text(odd_char, max_size=20).map(lambda t: f'model:\n  name_or_path: "{t}'.encode("utf-8", "surrogatepass")),
        st.sampled_from([
            b"training:\n\tlearning_rate: 0.1\n", b"\ttraining: {}\n", b"- a\n- b\n", b"5\n", b"'text'\n",
            b"\xff\xfe\x00t\x00r", b"training:\n  optim: \xc3\x28\n", b"\x00", b"training: {a: \x01}\n",
            b"---\ntraining: {}\n---\nlora: {}\n", b"%YAML 9.9\n---\na: 1\n", b"training: &a {x: *a}\n",
            b"lora: &a [*a]\n", b"training:\n  seed: 2024-13-01\n", b"training:\n  seed: !!timestamp x\n",
            b"training:\n  seed: !!int x\n", b"training:\n  bf16: !!bool maybe\n", b"training: !!set {a}\n",
            b"training:\n  seed: " + b"9" * 5000 + b"\n", b'samples:\n  reference_text: "\\ud800"\n',
            b'model:\n  name_or_path: "a\\udbffb"\n', b"1: 2\n", b"null: 1\n", b"? [a, b]\n: 1\n",
            b"training:\n  learning_rate: .inf\n", b"autotune:\n  memory_fraction: .nan\n",
            b"training:\n  lr_scheduler_kwargs:\n    x: &x 1\n    y: *z\n", b"training: {x: 1, x: 2",
            b"eval_data_dir: !!binary /w==\n", b"lora:\n  r: 8\n   lora_alpha: 16\n",
        ]),
        st.integers(60, 3000).map(lambda n: f"training:\n  lr_scheduler_kwargs: {nested(n, '{}').replace('{', '{a: ')}\n".encode()),
        st.integers(60, 3000).map(lambda n: f"lora:\n  target_modules: {nested(n)}\n".encode()),
        st.integers(6, 8).map(lambda n: f"training:\n  lr_scheduler_kwargs: {billion_laughs_flow(n)}\n".encode()),
    )
    doc = st.one_of(st.one_of(typed_bad, section_scalar, st.tuples(unknown_key, st.integers())).map(typed_doc), raw)

    @st.composite
    def decorated(draw):
        text = draw(doc)
        if draw(st.booleans()):
            text = text.replace(b"\n", b"\r\n")
        if draw(st.booleans()):
            text = b"\xef\xbb\xbf" + text
        if draw(st.booleans()):
            text = b"# a user's config\n" + text
        return text
    return decorated()


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_yaml_config_files(data, work, marker, data_dir):
    doc = data.draw(yaml_docs(marker), label="yaml")
    path = work / "user.yaml"
    path.write_bytes(doc)
    if data.draw(st.integers(0, 4), label="via train") == 0:
        # No `--model tiny` here: the flag would override (rightly) a bad `model.name_or_path` in the file.
        argv = ["--data", str(data_dir), "--check-data", "--config", str(path)]
        outcome = run_cli(train.main, argv)
    else:
        outcome = run_cli(probe.main, ["--json", "--config", str(path)])
    assert_one_line_error(outcome, "YAML config files", doc[:300])
    assert not marker.exists()


# ------------------------------------------------------------- JSONL lines ---

MAX_LENGTH = 200   # --set data.max_length=200: short lines fit (53 template tokens + bytes + codes + 1)
short_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(lambda t: t.strip())
good_codes = st.lists(st.integers(0, 65535), min_size=1, max_size=20)
good_obj = st.fixed_dictionaries({"text": short_text, "code": good_codes})


def dumps(obj) -> bytes:
    """One JSONL line; a lone surrogate is written as its `\\udXXX` escape, as JSON allows."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode()


odd_text = st.tuples(short_text, st.sampled_from(["\u200f", "\u202e", "\u0000", "\ufeff", "\u2028", "😀", ""])).map("".join)
lone = st.integers(0xD800, 0xDFFF).map(chr)
bad_elem = st.one_of(st.booleans(), st.floats(), st.integers(max_value=-1), st.integers(min_value=65536),
                     huge_int, st.text(max_size=3), st.none(), st.just([1]), st.just({"c": 1}))
raw_elem = st.sampled_from(["1e400", "-1e400", "9" * 5000, "-" + "9" * 5000, "1E+999", "-0.0", "NaN", "-Infinity",
                            "1.0", "0x10", "1_000", "+1", "01", ".5", "true", "[]"])


@st.composite
def bad_line(draw, folder_name: str) -> bytes:
    obj = draw(good_obj)
    obj["text"] = draw(st.one_of(st.just(obj["text"]), odd_text))
    key = draw(st.sampled_from(["code", "codes"]))
    obj[key] = obj.pop("code")
    kind = draw(st.sampled_from(["truncate", "text", "codes", "elem", "raw_elem", "audio", "speaker",
                                 "not_object", "bytes", "nesting", "surrogate"]))
    if kind == "truncate":
        line = dumps(obj)
        return line[: draw(st.integers(1, len(line) - 1))]
    if kind == "text":
        choice = draw(st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                                st.just({"t": "x"}), st.sampled_from(["", " ", "\t\u3000", None, "DROP"])))
        if choice == "DROP":
            del obj["text"]
        else:
            obj["text"] = choice
    elif kind == "codes":
        obj[key] = draw(st.one_of(st.integers(), st.text(max_size=3), st.booleans(), st.none(), st.floats(),
                                  st.just([]), st.just({"0": 1}), st.just([[1, 2], [3]]), st.just([[1], [2]])))
    elif kind == "elem":
        codes = obj[key]
        codes.insert(draw(st.integers(0, len(codes))), draw(bad_elem))
    elif kind == "raw_elem":
        head = dumps({**obj, key: None})[: -len(b"null}")]
        codes = [str(c) for c in obj[key]]
        codes.insert(draw(st.integers(0, len(codes))), draw(raw_elem))
        return head + ", ".join(codes).join("[]").encode() + b"}"
    elif kind == "audio":
        del obj[key]
        choice = draw(st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2),
                                st.sampled_from(["", "  ", "missing/clip.wav", "a" * 300 + ".wav", "a\u0000.wav",
                                                 ".", "train.jsonl", f"../{folder_name}", "/dev/null", "NONE"])))
        if choice != "NONE":
            obj["audio"] = choice
    elif kind == "speaker":
        obj["speaker"] = draw(st.one_of(st.floats(), st.lists(st.text(max_size=2), max_size=2),
                                        st.just({"id": 1}), st.sampled_from([[], {}])))
    elif kind == "not_object":
        return dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(),
                                    st.floats(), st.none(), st.booleans())))
    elif kind == "bytes":
        return draw(st.sampled_from([b"\xff\xfe{}", b'{"text": "\xc3", "code": [1]}', b'{"text": "\xc0\xaf", "code": [1]}',
                                     b'{"text": "\xed\xa0\x80", "code": [1]}', b'{"text": "a\x01b", "code": [1]}',
                                     b'{"text": "a\x00b", "code": [1]}', b'\xef\xbb\xbf{"text": "a", "code": [1]}',
                                     b'{"text": "a", "code": [1]}\x00', b'{"text": "a", "code": [1], "text": 5}',
                                     b"{'text': 'a', 'code': [1]}", b'{"text": "a", "code": [1],}']))
    elif kind == "nesting":
        n = draw(st.integers(1000, 100_000))
        return draw(st.sampled_from([b"[" * n, b'{"text": "a", "code": ' + b"[" * n + b"1" + b"]" * n + b"}"]))
    elif kind == "surrogate":
        where = draw(st.integers(0, len(obj["text"])))
        obj["text"] = obj["text"][:where] + draw(lone) + obj["text"][where:]
    return dumps(obj)


@st.composite
def jsonl_file(draw, bad_lines):
    """(file bytes, layout): one valid line first (so a BOM-led line is never the file's
    first), then the others shuffled; BOM, CRLF and blank lines at random."""
    rest = [dumps(o) for o in draw(st.lists(good_obj, min_size=1, max_size=3))]
    rest += draw(bad_lines)
    rest = draw(st.permutations(rest))
    lines = [dumps(draw(good_obj))] + list(rest)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(1, len(lines))), b"   ")
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = eol.join(lines) + (eol if draw(st.booleans()) else b"")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body


_case = Counter()


def fresh_dir(work: Path) -> Path:
    _case["n"] += 1
    folder = work / f"data-{_case['n']}"
    folder.mkdir()
    return folder


def check_data_argv(folder: Path, *extra: str) -> list[str]:
    return ["--data", str(folder), "--check-data", "--model", "tiny", "--set", f"data.max_length={MAX_LENGTH}", *extra]


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_jsonl_lines(data, work):
    folder = fresh_dir(work)
    content = data.draw(jsonl_file(st.lists(bad_line(folder.name), min_size=1, max_size=3)), label="jsonl")
    where = data.draw(st.sampled_from(["train.jsonl", "val.jsonl", "all.jsonl", "--val"]), label="file")
    good = b'{"text": "fine", "code": [1, 2, 3]}\n{"text": "also fine", "code": [4]}\n'
    extra = [] if not data.draw(st.booleans(), label="json") else ["--json"]
    if where == "val.jsonl":
        (folder / "train.jsonl").write_bytes(good)
    if where == "--val":
        (folder / "train.jsonl").write_bytes(good)
        (work / "held-out").mkdir(exist_ok=True)
        val = work / "held-out" / f"val-{_case['n']}.jsonl"
        val.write_bytes(content)
        extra += ["--val", str(val)]
    else:
        (folder / where).write_bytes(content)
    outcome = run_cli(train.main, check_data_argv(folder, *extra))
    assert_one_line_error(outcome, "JSONL data lines", content[:300])
    assert "malformed line" in outcome.stderr


long_obj = st.fixed_dictionaries({"text": short_text, "code": st.lists(st.integers(0, 65535), min_size=MAX_LENGTH,
                                                                           max_size=MAX_LENGTH + 300)})


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_over_long_samples_are_skipped_and_listed(data, work):
    folder = fresh_dir(work)
    # Distinct clips: a second copy of the same codes is a duplicate, kept once and listed as such.
    longs = data.draw(st.lists(long_obj, min_size=1, max_size=2, unique_by=lambda o: tuple(o["code"])), label="long")
    content = data.draw(jsonl_file(st.just([dumps(o) for o in longs])), label="jsonl")
    path = folder / "train.jsonl"
    path.write_bytes(content)
    outcome = run_cli(train.main, check_data_argv(folder, "--json"))
    TALLY["skip_cases"] += 1
    assert outcome.code == 0 and outcome.stderr == "", outcome
    report = json.loads(outcome.stdout)
    body = content.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    expected = [f"{path}:{i}" for i, line in enumerate(body, 1) if line.strip() and len(json.loads(line)["code"]) >= MAX_LENGTH]
    assert sorted(s["source"] for s in report["skipped"]) == sorted(expected)
    assert all(s["tokens"] > MAX_LENGTH and s["max_length"] == MAX_LENGTH for s in report["skipped"])
    # The file's other lines are short and may repeat one another's codes: each clip is kept once.
    short = [tuple(json.loads(line)["code"]) for line in body
             if line.strip() and len(json.loads(line)["code"]) < MAX_LENGTH]
    assert report["train_samples"] + report["val_samples"] == len(set(short))
    assert len(report["duplicates"]) == len(short) - len(set(short))
    # The human table lists them too, on stdout, still exit 0.
    table = run_cli(train.main, check_data_argv(folder))
    assert table.code == 0 and table.stderr == ""
    assert all(f"skipped {source}" in " ".join(table.stdout.split()) for source in expected)
    TALLY["skipped_ok"] += 1


# ------------------------------------------------------- train.py arguments ---

def train_bad_groups(marker: Path, work: Path, data_dir: Path):
    empty = work / "empty-dir"
    empty.mkdir(exist_ok=True)
    wrong_suffix = work / "notes.txt"
    wrong_suffix.write_text("hi\n", encoding="utf-8")
    bad_yaml = work / "train-bad.yaml"
    bad_yaml.write_text("lora:\n  r: [8\n", encoding="utf-8")
    return st.one_of(
        argv_text.map(lambda s: ["--zz" + s]),
        argv_text.filter(lambda s: not s.startswith("-")).map(lambda s: [s]),
        st.sampled_from([["--vram-limit"], ["--set"], ["--config"], ["--data"], ["--val"], ["--sweep"], ["-q"]]),
        st.one_of(not_float, st.sampled_from(["nan", "inf", "1e400", "0", "-1", "-1e-9", "1e999", "0x10"]))
        .map(lambda v: ["--vram-limit", v]),
        st.sampled_from([["--val", str(work / "no-such.jsonl")], ["--val", "v" * 5000], ["--val", str(empty)]]),
        st.sampled_from([["--sweep", "lora.r=8,16"], ["--sweep", "lora.r="], ["--sweep", "=1,2"], ["--sweep", "x"]]),
        st.sampled_from([["--config", str(bad_yaml)], ["--config", str(work / "nope.yaml")]]),
        st.lists(set_items(marker), min_size=1, max_size=2).map(lambda items: [a for i in items for a in ("--set", i)]),
    )


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_train_command_line(data, work, marker, data_dir):
    empty = work / "empty-dir"
    bad_data = data.draw(st.sampled_from([None, None, None, "missing", "long", "empty", "suffix", "absent"]), label="data")
    group = data.draw(train_bad_groups(marker, work, data_dir), label="bad") if bad_data in (None, "absent") else []
    data_arg = {None: str(data_dir), "missing": str(work / "nowhere"), "long": "d" * 5000, "empty": str(empty),
                "suffix": str(work / "notes.txt"), "absent": None}[bad_data]
    base = [["--check-data"], ["--model", "tiny"]] + ([["--data", data_arg]] if data_arg else [])
    base += data.draw(st.lists(st.sampled_from([["--json"]]), max_size=1), label="extras")
    argv = (data.draw(shuffled_argv(base, [])) + group) if len(group) == 1 else data.draw(shuffled_argv(base + ([group] if group else []), []))
    assert_one_line_error(run_cli(train.main, argv), "train.py arguments", argv)
    assert not marker.exists()


# ---------------------------------------------------------- subprocesses ---

def offline_env(work: Path) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(work / "hf-home"), "PYTHONIOENCODING": "utf-8", "COLUMNS": "200"}


def test_representative_bad_inputs_as_real_processes(work, marker, data_dir):
    """The whole path, `python probe.py ...` / `python train.py ...`: exit 2, one line, no traceback."""
    bad = fresh_dir(work)
    (bad / "train.jsonl").write_bytes(b"\r\n".join([
        b'\xef\xbb\xbf{"text": "ok", "code": [1, 2, 3]}',
        b'{"text": "big", "code": [' + b"9" * 5000 + b"]}",
        b'{"text": "inf", "code": [1e400]}',
        b'{"text": "\\ud800 \xe2\x80\x8f", "code": [1]}',
        b'{"text": "bool", "code": [true, 2]}',
        b'{"text": "neg", "code": [-1, 2.5]}',
        b'{"text": "long path", "audio": "' + b"a" * 300 + b'.wav"}',
        b'{"text": "cut", "co',
    ]) + b"\r\n")
    tag_yaml = work / "tag.yaml"
    tag_yaml.write_text(f"training:\n  learning_rate: {tag_payloads(marker)[0]}\n", encoding="utf-8")
    laughs = work / "laughs.yaml"
    laughs.write_text(f"training:\n  lr_scheduler_kwargs: {billion_laughs_flow(8)}\n", encoding="utf-8")
    deep = work / "deep.yaml"
    deep.write_text("\ufefftraining:\r\n  lr_scheduler_kwargs: " + nested(5000, "[]") + "\r\n", encoding="utf-8")
    cases = [
        ("probe.py", ["--json", *RTX, "--vram", "1e300"]),
        ("probe.py", ["--json", *RTX, "--vram", "24", "--cc", "9" * 30 + ".0"]),
        ("probe.py", ["--json", *RTX, "--vram", "24", "--count", "1000000000"]),
        ("probe.py", ["--json", "--set", "training.learning_rate=.inf", "--set", "lora.r=" + str(2**70)]),
        ("probe.py", ["--json", "--set", f"lora.r={tag_payloads(marker)[0]}"]),
        ("probe.py", ["--json", "--set", f"training.learning_rate={code_payloads(marker)[0]}"]),
        ("probe.py", ["--json", "--config", str(tag_yaml)]),
        ("probe.py", ["--json", "--config", str(laughs)]),
        ("probe.py", ["--json", "--config", str(deep)]),
        ("probe.py", ["--json", "--bogus\nsecond line"]),
        ("train.py", ["--data", str(bad), "--check-data", "--model", "tiny", "--json"]),
        ("train.py", ["--data", "d" * 5000, "--check-data", "--model", "tiny"]),
        ("train.py", ["--data", str(data_dir), "--check-data", "--model", "tiny", "--vram-limit", "inf"]),
        ("train.py", ["--data", str(data_dir), "--check-data", "--model", "tiny", "--set", "training.seed=-1"]),
    ]

    def run(case):
        script, args = case
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=offline_env(work),
                              capture_output=True, timeout=120)
        return case, proc, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, cases))
    for (script, args), proc, _ in results:
        stderr = proc.stderr.decode("utf-8", "backslashreplace")
        outcome = Outcome(proc.returncode, proc.stdout.decode("utf-8", "backslashreplace"), stderr)
        assert_one_line_error(outcome, "real subprocesses", [script, *[a[:80] for a in args]])
        TALLY["subprocess"] += 1
    assert "5000 digits" not in results[10][1].stderr.decode() and b"malformed lines" in results[10][1].stderr
    assert not marker.exists()


def test_undecodable_path_prints_back_under_a_strict_utf8_stdout(work):
    """A data folder whose name is not UTF-8 (bytes 0xff) reaches Python as a surrogate escape;
    printing it in `--check-data --json` under PYTHONIOENCODING=utf-8 used to crash."""
    folder = work / "data-\udcff"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a", "code": [1, 2]}\n{"text": "b", "code": [3]}\n', encoding="utf-8")
    val = folder / "val-\udce9.jsonl"   # `--val` goes through the config (`eval_data_dir`): accepted too
    val.write_text('{"text": "c", "code": [4]}\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "train.py", "--data", str(folder), "--check-data", "--model", "tiny", "--json",
                           "--val", str(val)], cwd=REPO, env=offline_env(work), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "backslashreplace")
    assert b"Traceback" not in proc.stderr
    assert os.fsencode(str(folder)) in proc.stdout  # the original bytes, as `ls` shows them
    report = json.loads(proc.stdout.decode("utf-8", "surrogateescape"))
    assert (report["train_samples"], report["val_samples"], report["val_source"]) == (2, 1, "eval_data_dir")


# ---------------------------------------------------------------- summary ---

def test_summary(capsys):
    """Runs last (file order): the tally of every test above."""
    if not TALLY["inputs"]:
        pytest.skip("run the whole file to get the tally")
    line = (f"fuzz: {TALLY['inputs']} inputs, {TALLY['one_line']} exit 2 with one line, "
            f"{TALLY['tracebacks']} tracebacks; {TALLY['skipped_ok']} over-long cases skipped and listed (exit 0); "
            f"{TALLY['accepted']} of the guide's bare keys read in their section (exit 0)")
    per = ", ".join(f"{name} {count}" for name, count in CATEGORY.items())
    with capsys.disabled():
        print(f"\n{line}\n  by category: {per}")
    assert TALLY["tracebacks"] == 0
    assert TALLY["one_line"] + TALLY["accepted"] == TALLY["inputs"]
    if len(CATEGORY) >= 6:  # the whole file ran
        assert TALLY["inputs"] >= 200
        assert TALLY["subprocess"] >= 12
