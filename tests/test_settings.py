"""Each command's settings dataclass is the one source of its flags, --help defaults, choices, config-file
keys and (generate) the job service's schema; mistakes are one line naming the flag or key; old names
still work with a note; generate's defaults are the measured best; the options reference is current."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing

import click
import pytest
import typer
import yaml
from genhelpers import run_cli

from potstill.cli import reference
from potstill.cli.demo.run import DemoConfig
from potstill.cli.jobs_cmd import JobsConfig, ListConfig, SubmitConfig, WaitConfig
from potstill.cli.main import app
from potstill.cli.store_cmd import ExportConfig, VerifyConfig
from potstill.settings import (
    REQUIRED_OR_CONFIG,
    choices_of,
    default_text,
    fields_of,
    flag_of,
    info_of,
    load_settings,
    shown_default,
)
from potstill.share.report import ReportConfig
from potstill.store.errors import PotstillError, StoreError
from potstill.student_train.config import EvalConfig, TrainConfig, resolve_hidden_pairs
from potstill.student_train.errors import ConfigError
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.service.settings import DEFAULT_SERVER, ServeConfig, ServiceError, read_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [("generate", GenerateConfig, GenerateError), ("train", TrainConfig, ConfigError),
            ("eval", EvalConfig, ConfigError), ("serve", ServeConfig, ServiceError),
            ("store verify", VerifyConfig, StoreError), ("store export", ExportConfig, StoreError),
            ("store report", ReportConfig, StoreError), ("demo", DemoConfig, PotstillError),
            ("jobs submit", SubmitConfig, ServiceError), ("jobs status", JobsConfig, ServiceError),
            ("jobs list", ListConfig, ServiceError), ("jobs cancel", JobsConfig, ServiceError),
            ("jobs wait", WaitConfig, ServiceError)]
# A value other than the default for every setting that a plain rule below cannot pick validly.
SAMPLES = {"rationale_template": "Q: {prompt}", "beta": 0.25, "alpha": 0.5, "eval_fraction": 0.1,
           "hidden_map": "1:2", "workers": 2, "worker_index": 1, "gpu_memory_utilization": 0.5, "port": 8123,
           "max_body_bytes": 8192, "writer_threads": 3, "logprob_bits": 10, "codec": "packed",
           "head_lr_scale": 2.0, "host": "127.0.0.2", "allow_url_scheme": ["s3"], "max_length": 64,
           "allow_host": ["gpu-box"], "data_root": ["/d"], "read_root": ["/r"], "write_root": ["/w"],
           "teacher_weights": "2,1", "hidden_from": "s"}
# other settings a sample needs (a relation loss needs layer pairs)
CONTEXT = {"relation_weight": {"hidden_map": "1:2"}, "worker_index": {"workers": 2},
           **{name: {"executor": "ray"} for name in ("ray_address", "num_actors", "gpus_per_actor")},
           "teacher_weights": {"store": ["s", "t"]}}


def command(name: str) -> tuple[click.Command, click.Context]:
    """The click command `name` ("train", "store verify") and a context to read its help in."""
    cmd: click.Command = typer.main.get_command(app)
    ctx = click.Context(cmd, info_name="potstill")
    for part in name.split():
        cmd = cmd.get_command(ctx, part)  # type: ignore[attr-defined]
        ctx = click.Context(cmd, info_name=part, parent=ctx)
    return cmd, ctx


def sample(f: dataclasses.Field, hint: typing.Any) -> typing.Any:
    """A valid value of a setting, other than its default."""
    if f.name in SAMPLES:
        return SAMPLES[f.name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if choices_of(f, hint):
        return next(c for c in choices_of(f, hint) if c != f.default)
    if typing.get_origin(base) is list:
        return [0, 2] if typing.get_args(base)[0] is int else ["s1", "s2"]
    default = f.default if f.default is not None else {bool: False, int: 3, float: 1.0, str: "x"}[base]
    return {bool: lambda d: not d, int: lambda d: d + 1, float: lambda d: d / 2 if d > 0 else d - 0.5 if d < 0 else 0.5, str: lambda d: d + "x"}[base](default)


def cli_args(flag: str, value: typing.Any, is_bool: bool) -> list[str]:
    if is_bool:
        return [flag if value else f"--no-{flag[2:]}"]
    if isinstance(value, list):
        return [x for v in value for x in (flag, str(v))] if isinstance(value[0], str) else [flag, ",".join(map(str, value))]
    return [flag, str(value)]


@pytest.mark.parametrize("name,cls,error", COMMANDS)
def test_every_setting_has_one_flag_help_default_choices_and_key(tmp_path, name, cls, error):
    cmd, ctx = command(name)
    options = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    required = {"teacher": "t", "prompts": "p", "store": "s", "student": "m", "out": "o", "to": "t.jsonl"}
    takes_config = any(p.name == "config" for p in cmd.params)
    for f, hint in fields_of(cls):
        info = info_of(f)
        option = options[f.name]  # the option's name is the field's: the flag feeds the key
        assert option.opts[0] == flag_of(f) and not option.hidden, f.name
        is_bool = bool(option.secondary_opts)
        assert option.secondary_opts == ([f"--no-{flag_of(f)[2:]}"] if is_bool else []), f.name
        help_line = option.get_help_record(ctx)[1]
        if info.required:
            assert help_line.endswith(REQUIRED_OR_CONFIG if takes_config else "[required]"), f.name
        else:
            assert help_line.endswith(f"[default: {shown_default(f)}]"), (f.name, help_line)
            if info.shown_default is None and f.default_factory is dataclasses.MISSING:  # the value itself
                flag = f"{flag_of(f)}/--no-{flag_of(f)[2:]}" if is_bool else None
                assert shown_default(f) == default_text(f.default, flag) and f.default is not None, f.name
        assert help_line.startswith(info.help), f.name
        choices = choices_of(f, hint)
        if choices:
            assert option.metavar == "[" + "|".join(choices) + "]", f.name
        for old in info.aliases:  # an old spelling: accepted, not shown
            assert any(old in p.opts and p.hidden for p in cmd.params), (f.name, old)

        # The same value through the config-file key and through the flag gives the same setting.
        value = sample(f, hint)
        base = {k: v for k, v in required.items() if k in {g.name for g in dataclasses.fields(cls)}}
        base.update(CONTEXT.get(f.name, {}) if cls is not ServeConfig else {})
        path = tmp_path / f"{name.replace(' ', '-')}-{f.name}.yaml"
        path.write_text(yaml.safe_dump({**base, f.name: value}))
        from_file = getattr(load_settings(cls, str(path), error=error), f.name)
        positional = ["x" for p in cmd.params if p.param_type_name == "argument"]  # a store path, a job id
        parsed = cmd.make_context(name.split()[-1], positional + cli_args(flag_of(f), value, is_bool), parent=ctx.parent)
        from_flag = getattr(load_settings(cls, None, {**base, f.name: parsed.params[f.name]}, error=error), f.name)
        assert from_file == from_flag != getattr(load_settings(cls, None, base, error=error), f.name), f.name


def test_the_service_schema_is_generates_settings():
    from potstill.teacher_gen.service.settings import LOAD_FIELDS
    from potstill.teacher_gen.service.spec import NOT_IN_SPEC, JobSpec

    fields = JobSpec.model_fields
    assert set(fields) == {f.name for f in dataclasses.fields(GenerateConfig)} - set(NOT_IN_SPEC)
    for f, _ in fields_of(GenerateConfig):
        if f.name in NOT_IN_SPEC or f.name in ("prompts", "store"):
            continue
        spec = fields[f.name]
        assert info_of(f).help in (spec.description or ""), f.name
        if f.name in LOAD_FIELDS:
            assert spec.default is None  # the service's own value stands
        elif f.default_factory is not dataclasses.MISSING:
            assert spec.default_factory() == f.default_factory(), f.name
        else:
            assert spec.default == f.default, f.name
    # an old name is still taken, as the new one
    job = JobSpec.model_validate({"prompts": "/p", "store": "/s", "temperature": 0.5})
    assert job.model_dump(exclude_unset=True) == {"prompts": "/p", "store": "/s", "sampling_temperature": 0.5}


# -- one-line mistakes ---------------------------------------------------------------------------
def invoke(args: list[str]) -> str:
    try:
        app(args, standalone_mode=False)
    except PotstillError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("name", ["generate", "train", "serve"])
def test_an_unknown_key_or_a_bad_value_is_one_line_naming_it(tmp_path, name):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('colour = "blue"\n')
    assert invoke([name, "--config", str(unknown)]) == f"config file {unknown}: unknown setting 'colour'"
    bad = tmp_path / "bad.json"
    key = {"generate": "top_k", "train": "max_steps", "serve": "port"}[name]
    bad.write_text(json.dumps({key: "many"}))
    assert invoke([name, "--config", str(bad)]) == f"--{key.replace('_', '-')}: expected int, got 'many'"
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1\n")
    message = invoke([name, "--config", str(broken)])
    assert message.startswith(f"config file {broken}: cannot parse") and "\n" not in message


def test_a_choice_outside_the_literal_is_refused_the_same_from_a_file_and_a_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: s\nstudent: m\nout: o\nloss: kl\n")
    expected = "--loss must be one of forward_kl, reverse_kl, jsd; got 'kl'"
    assert invoke(["train", "--config", str(path)]) == expected
    assert invoke(["train", "--store", "s", "--student", "m", "--out", "o", "--loss", "kl"]) == expected
    with pytest.raises(ConfigError, match=expected):  # built directly, then validated
        TrainConfig(store="s", student="m", out="o", loss="kl").validate()  # type: ignore[arg-type]


# -- old names -----------------------------------------------------------------------------------
def test_old_flags_and_keys_still_work_with_a_note(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("store: s\nstudent: m\nout: o\ntemperature: 2.0\n")
    assert TrainConfig.build(str(old)).kd_temperature == 2.0
    assert capsys.readouterr().err == f"note: config file {old}: temperature is now kd_temperature\n"
    assert GenerateConfig.build(teacher="t", prompts="p", store="s", temperature=0.0).sampling_temperature == 0.0
    assert "temperature is now sampling_temperature" in capsys.readouterr().err
    both = invoke(["train", "--store", "s", "--student", "m", "--out", "o", "--temperature", "2", "--kd-temperature", "3"])
    assert both == "--kd-temperature and --temperature (its old spelling) were both given, with different values"
    # the old flag reaches the run: here its own check refuses the value
    assert invoke(["train", "--store", "s", "--student", "m", "--out", "o", "--temperature", "-1"]) == (
        "--kd-temperature must be positive, got -1.0")
    assert capsys.readouterr().err.strip().splitlines()[-1] == "note: --temperature is now --kd-temperature"
    assert invoke(["generate", "--teacher", "t", "--prompts", "p", "--store", "s", "--temperature", "-1"]) == (
        "--sampling-temperature must be >= 0, got -1.0")
    assert capsys.readouterr().err.splitlines() == ["note: --store is now --out",
                                                    "note: --temperature is now --sampling-temperature"]
    assert "--temperature" not in {o for p in command("train")[0].params if not p.hidden for o in p.opts}
    # old spellings of options that are not settings follow the same rule
    unreachable = tmp_path / "c.yaml"
    unreachable.write_text("prompts: /p\ntemperature: 0.5\n")
    message = invoke(["jobs", "submit", "--server", "http://127.0.0.1:9", "--config", str(unreachable), "--store", "/s"])
    assert message.startswith("cannot reach the potstill service")  # the spec was complete
    assert capsys.readouterr().err.splitlines() == [  # flags first, then the file, as generate says them
        "note: --store is now --out", f"note: config file {unreachable}: temperature is now sampling_temperature"]


# -- defaults from the environment -------------------------------------------------------------
def test_the_jobs_server_and_token_defaults_are_the_ones_used(monkeypatch):
    cmd, ctx = command("jobs status")
    monkeypatch.delenv("POTSTILL_SERVER", raising=False)
    parsed = cmd.make_context("status", ["j1"], parent=ctx.parent)
    assert load_settings(JobsConfig, None, {"server": parsed.params["server"]}).server == DEFAULT_SERVER
    monkeypatch.setenv("POTSTILL_SERVER", "http://gpu-box:9000")
    parsed = cmd.make_context("status", ["j1"], parent=ctx.parent)
    assert parsed.params["server"] == "http://gpu-box:9000"  # the variable stands for the flag
    assert cmd.make_context("status", ["j1", "--server", "http://a:1"], parent=ctx.parent).params["server"] == "http://a:1"
    # no --token-file: the token is $POTSTILL_TOKEN itself, as both commands' help says
    for name in ("jobs status", "jobs submit", "serve"):
        option = next(p for p in command(name)[0].params if p.name == "token_file")
        assert option.get_help_record(command(name)[1])[1].endswith(
            "[default: none: the token is $POTSTILL_TOKEN, if set]"), name
    monkeypatch.setenv("POTSTILL_TOKEN", " s3cret-token-value-0123 \n")
    assert read_token(None) == "s3cret-token-value-0123"
    monkeypatch.delenv("POTSTILL_TOKEN")
    assert read_token(None) is None


# -- the defaults ----------------------------------------------------------------------------------
def test_generate_defaults_to_the_measured_best_and_help_says_so():
    d = GenerateConfig()
    assert (d.targets, d.sampler, d.samples, d.codec) == ("sampled", "systematic", 64, "compact")
    assert GenerateConfig(targets="topk").codec == "none" and GenerateConfig(targets="hybrid").codec == "compact"
    text = run_cli(["generate", "--help"]).stdout
    flat = " ".join(text.split())
    for shown in ("[default: sampled]", "[default: systematic]", "[default: 64]", "[default: compact; none with --targets topk]"):
        assert shown in flat, shown
    # the vLLM backend takes the default targets too: the run gets past its settings to the teacher
    assert invoke(["generate", "--teacher", "t", "--prompts", "p", "--out", "s", "--backend", "vllm"]).startswith(
        "teacher t is neither a local folder nor in the local Hugging Face cache")


@pytest.mark.slow
def test_train_auto_picks_sampled_targets_from_a_default_store(readme_path):
    """The README's path: generate with only its required flags, then train with only its own."""
    from potstill.store import open_store

    t = open_store(str(readme_path["dir"] / "run1.store")).manifest.targets
    assert (t.kind, t.sampler, t.samples, t.codec) == ("sampled", "systematic", 64, "compact")
    with open(readme_path["dir"] / "student" / "training_report.json") as f:
        assert json.load(f)["targets"] == "sampled"


def test_negative_teacher_layers_resolve_as_generate_resolves_them():
    assert resolve_hidden_pairs([(1, -1), (2, 0), (3, -3)], 4) == [(1, 4), (2, 0), (3, 2)]
    with pytest.raises(ConfigError, match=r"--hidden-map 1:-6: the teacher has hidden_states 0\.\.4 \(-5\.\.-1"):
        resolve_hidden_pairs([(1, -6)], 4)
    with pytest.raises(ConfigError, match="lists 1:4 twice"):
        resolve_hidden_pairs([(1, -1), (1, 4)], 4)
    with pytest.raises(ConfigError, match="does not record the teacher's layer count"):
        resolve_hidden_pairs([(1, -1)], None)


# -- the reference -------------------------------------------------------------------------------
def test_the_options_reference_is_current():
    with open(os.path.join(ROOT, reference.DEFAULT_PATH), encoding="utf-8") as f:
        assert f.read() == reference.render(), "run: python -m potstill.cli.reference"
    text = reference.render()
    for _, cls, _, config_file in reference.COMMANDS:
        for f in dataclasses.fields(cls):
            assert f"| `{flag_of(f)}`" in text and (not config_file or f"| `{f.name}`" in text), f.name


@pytest.mark.parametrize("flags,expected", [
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--hidden-weight", "-inf"], "--hidden-weight must be a finite number, got -inf"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 (off) or positive, got -1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative, got -0.1"),
    (["--max-length", "1"], "--max-length must be 0 (never truncate) or at least 2, got 1: a shorter sequence "
                            "has no token to predict"),
])
def test_train_settings_that_would_train_nothing_or_silently_off_are_refused(flags, expected):
    """NaN fails every comparison: --max-grad-norm nan used to turn clipping off without a word, and
    --max-length 1 trained every step on a loss of 0."""
    assert invoke(["train", "--store", "s", "--student", "m", "--out", "o", *flags]) == expected


def test_eval_settings_must_be_finite():
    assert invoke(["eval", "--store", "s", "--student", "m", "--eval-fraction", "nan"]) == (
        "--eval-fraction must be a finite number, got nan")
