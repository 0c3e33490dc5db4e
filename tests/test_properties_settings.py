"""Property-based tests (hypothesis) of the settings loader (potstill/settings.py) behind every command's
--config file and flags: for any mapping of known keys to any values, written as YAML, TOML or JSON,
loading either gives settings of each field's type that survive being written back and loaded again,
or fails with a single line, of the command's `PotstillError` subclass, that names the key or flag.
Derandomised, so CI runs the same cases every time."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from potstill.cli.demo.run import DemoConfig
from potstill.cli.jobs_cmd import JobsConfig, ListConfig, SubmitConfig, WaitConfig
from potstill.cli.store_cmd import ExportConfig, VerifyConfig
from potstill.settings import fields_of, flag_of, info_of, load_settings
from potstill.share.report import ReportConfig
from potstill.store.errors import PotstillError, StoreError
from potstill.student_train.config import EvalConfig, TrainConfig
from potstill.student_train.errors import ConfigError
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.service.settings import ServeConfig, ServiceError

PROPS = settings(derandomize=True, deadline=None, max_examples=400, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

COMMANDS: list[tuple[type, type[Exception]]] = [
    (GenerateConfig, GenerateError), (TrainConfig, ConfigError), (EvalConfig, ConfigError), (ServeConfig, ServiceError),
    (VerifyConfig, StoreError), (ExportConfig, StoreError), (ReportConfig, StoreError), (DemoConfig, PotstillError),
    (SubmitConfig, ServiceError), (JobsConfig, ServiceError), (ListConfig, ServiceError), (WaitConfig, ServiceError),
]
REQUIRED = {"teacher": "t", "prompts": "p", "store": "s", "student": "m", "out": "o", "to": "t.jsonl"}
FORMATS = ("yaml", "toml", "json")

# Values a config file can hold: every YAML/JSON scalar (huge integers, NaN and infinities included), lists
# and mappings of them, and text with control characters, astral planes and (JSON only) lone surrogates.
LONE_SURROGATES = ["\ud800", "a\udfffb", "\udc80"]  # JSON spells them; UTF-8 (files, paths) cannot hold them
sound_text = st.text(st.characters(codec="utf-8", exclude_characters="\x85\u2028\u2029"), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.integers(10**308, 10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | sound_text | st.sampled_from(["yes", "off", "1", "0.5", ""]) | st.sampled_from(LONE_SURROGATES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(sound_text, inner, max_size=2),
                      max_leaves=6)


def _choice_values(f: dataclasses.Field, hint: Any) -> st.SearchStrategy:
    """Valid values of a field too, so that loading sometimes succeeds with something else than defaults."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is Literal:
        return st.sampled_from(typing.get_args(base))
    if info_of(f).choices:
        return st.sampled_from(info_of(f).choices())
    return {bool: st.booleans(), int: st.integers(-3, 70_000), float: st.floats(-2, 2), str: sound_text.filter(str.strip) | st.sampled_from(LONE_SURROGATES)}.get(
        base, values)


@st.composite
def config_case(draw: st.DrawFn) -> tuple[type, type[Exception], dict[str, Any], str]:
    cls, error = draw(st.sampled_from(COMMANDS))
    fields = fields_of(cls)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=4, unique_by=lambda fh: fh[0].name))
    mapping = {k: v for k, v in REQUIRED.items() if k in {f.name for f, _ in fields}}
    for f, hint in chosen:
        mapping[f.name] = draw(_choice_values(f, hint) | values)
    return cls, error, mapping, draw(st.sampled_from(FORMATS))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's basic-string escapes; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"


def write_config(path: str, mapping: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        text = json.dumps(mapping)
    elif fmt == "yaml":
        text = yaml.safe_dump(mapping, allow_unicode=True)
    else:  # TOML has no null: a None is a key left out
        text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in mapping.items() if v is not None)
    with open(path, "wb") as f:  # a lone surrogate written as such: a file that is not valid UTF-8
        f.write(text.encode("utf-8", "surrogatepass"))


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return value is None or any(_has_type(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Settings equal field by field (a NaN setting equals itself: `==` alone would call it changed)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


@PROPS
@given(config_case())
# found: a lone surrogate in a path loaded, and `potstill train` then died in open() with a traceback
@example(case=(TrainConfig, ConfigError, {"store": "s\ud800", "student": "m", "out": "o"}, "json"))
# found: NaN and infinities were taken for any float setting (`jobs wait --poll nan`), and an integer
# beyond any float raised OverflowError
@example(case=(WaitConfig, ServiceError, {"poll": math.nan, "timeout": math.inf}, "yaml"))
@example(case=(WaitConfig, ServiceError, {"poll": 10**400}, "json"))
def test_a_config_file_loads_into_typed_settings_that_round_trip_or_fails_in_one_line(tmp_path_factory, case) -> None:
    cls, error, mapping, fmt = case
    folder = tmp_path_factory.mktemp("cfg")
    path = str(folder / f"c.{fmt}")
    write_config(path, mapping, fmt)
    try:
        loaded = load_settings(cls, path, error=error)
    except PotstillError as e:
        message = str(e)
        event("refused")
        assert isinstance(e, error), (type(e), message)
        assert message and "\n" not in message, message
        names = [path] + [n for n in mapping] + [flag_of(f) for f, _ in fields_of(cls) if f.name in mapping]
        assert any(n in message for n in names) or message.startswith("--"), message
        return
    event("loaded")
    for f, hint in fields_of(cls):
        value = getattr(loaded, f.name)
        assert _has_type(value, hint), (f.name, value)
        assert not isinstance(value, float) or math.isfinite(value), (f.name, value)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):  # a path, a host, a template: text the OS and UTF-8 files can hold
                os.fsencode(text)
    # What was loaded, written back (in every format that can hold it) and loaded again, is the same.
    back = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(cls)}
    escaped = any(isinstance(t, str) and not _utf8(t) for v in back.values() for t in (v if isinstance(v, list) else [v]))
    for out_fmt in FORMATS:
        if out_fmt == "toml" and any(v is None and f.default is not None for f in dataclasses.fields(cls)
                                     for v in [back[f.name]]):
            continue  # TOML has no null to say "none" where the default is something
        if out_fmt != "json" and escaped:
            continue  # an undecodable file-name byte ("\udc80", as typed names hold them): JSON alone spells it
        again_path = str(folder / f"again.{out_fmt}")
        write_config(again_path, back, out_fmt)
        again = load_settings(cls, again_path, error=error)
        assert _same(again, loaded), (out_fmt, back)


def test_a_lone_surrogate_in_a_text_setting_is_refused_in_one_line(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"store": "s\\ud800", "student": "m", "out": "o"}')
    with pytest.raises(ConfigError) as e:
        load_settings(TrainConfig, str(path), error=ConfigError)
    assert str(e.value) == "--store: 's\\ud800' holds a lone surrogate (\\ud800), which is not valid Unicode"
    path.write_text('{"allow_host": ["gpu-box", "\\udfff"]}')
    with pytest.raises(ServiceError, match=r"^--allow-host: '\\udfff' holds a lone surrogate"):
        load_settings(ServeConfig, str(path), error=ServiceError)
    # the undecodable bytes of a file name, as the command line hands them over, are a valid path
    assert load_settings(TrainConfig, None, {"store": "s\udcff", "student": "m", "out": "o"}).store == ["s\udcff"]


SECTIONS = {GenerateConfig: "generate", TrainConfig: "train", ServeConfig: "serve"}


@PROPS
@given(config_case(), st.booleans())
def test_the_same_values_as_flags_or_under_the_commands_section_load_the_same(tmp_path_factory, case, nested) -> None:
    """Typed flags and a file's `[generate]` / `train:` / `serve:` table are the same settings as top-level keys:
    the same result, or the same one-line refusal (file names aside)."""
    cls, error, mapping, fmt = case
    folder = tmp_path_factory.mktemp("cfg")
    flat_path, nested_path = str(folder / f"flat.{fmt}"), str(folder / f"nested.{fmt}")
    write_config(flat_path, mapping, fmt)
    write_config(nested_path, {SECTIONS[cls]: mapping} if nested and cls in SECTIONS else mapping, fmt)

    def outcome(path: str | None, overrides: dict[str, Any] | None) -> Any:
        try:
            return load_settings(cls, path, overrides, error=error, section=SECTIONS.get(cls))
        except PotstillError as e:
            assert isinstance(e, error) and "\n" not in str(e), (type(e), str(e))
            return str(e).replace(str(path), "FILE")

    from_file = outcome(flat_path, None)
    assert _same_outcome(outcome(nested_path, None), from_file)
    if fmt != "toml" and not isinstance(from_file, str):  # flags: no None (an untyped flag), so no TOML-less keys
        flags = {k: v for k, v in mapping.items() if v is not None}
        from_flags = outcome(None, flags)
        dropped = any(v is None for v in mapping.values())
        assert dropped or _same_outcome(from_flags, from_file), (from_flags, from_file)


def _same_outcome(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):  # a parser's message says where in the file: that may differ
        return a.split(" cannot parse (")[0] == b.split(" cannot parse (")[0]
    return a == b if isinstance(a, str) or isinstance(b, str) else _same(a, b)
