"""What `--help` says is what a run does, and the README's path prints no warning of ours.

For every command, each setting's `[default: X]` in `--help` is the default of its settings
dataclass, and loading the settings with nothing typed keeps that value. Then the README's path runs
for real on the tiny test models with only the required flags (generate, student init, train, eval,
the store commands, and a small demo), each under a warnings filter that turns any warning raised
from potstill's own modules into an error, and what the runs record (the store's manifest,
training_report.json, the student's config, eval's JSON, the demo's report.json) must be the
defaults that `--help` shows.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import click
import pytest
import typer
from readmepath import DEMO_TYPED

from potstill.cli.main import app
from potstill.cli.reference import COMMANDS
from potstill.cli.threads import auto_threads
from potstill.settings import (
    REQUIRED,
    REQUIRED_OR_CONFIG,
    fields_of,
    info_of,
    load_settings,
    shown_default,
)
from potstill.student_train.config import EvalConfig, TrainConfig
from potstill.teacher_gen.config import GenerateConfig


def command(name: str) -> tuple[click.Command, click.Context]:
    cmd: click.Command = typer.main.get_command(app)
    ctx = click.Context(cmd, info_name="potstill")
    for part in name.split():
        cmd = cmd.get_command(ctx, part)  # type: ignore[attr-defined]
        ctx = click.Context(cmd, info_name=part, parent=ctx)
    return cmd, ctx


def literal_default(f: dataclasses.Field) -> bool:
    """Whether --help shows the default value itself (not words such as "the teacher's")."""
    return info_of(f).shown_default is None and not info_of(f).required


def default_of(f: dataclasses.Field) -> typing.Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("name,cls", [(name, cls) for name, cls, _, _ in COMMANDS])
def test_help_shows_each_default_and_loading_nothing_keeps_it(name, cls):
    cmd, ctx = command(name)
    options = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    takes_config = any(p.name == "config" and p.param_type_name == "option" for p in cmd.params) \
        and not any(f.name == "student_config" for f in dataclasses.fields(cls))
    names = {f.name for f in dataclasses.fields(cls)}
    given: dict[str, typing.Any] = {f.name: ["x.jsonl"] if typing.get_origin(hint) is list else "x.jsonl"
                                    for f, hint in fields_of(cls) if info_of(f).required}
    if name == "student init":
        given["layers"] = "2"  # required unless --config gives the shape
    loaded = load_settings(cls, None, given)
    for f, _hint in fields_of(cls):
        shown = " ".join(options[f.name].get_help_record(ctx)[1].split())
        if info_of(f).required:
            assert shown.endswith(REQUIRED_OR_CONFIG if takes_config else REQUIRED), (name, f.name, shown)
            continue
        assert shown.endswith(f"[default: {' '.join(shown_default(f).split())}]"), (name, f.name, shown)
        if literal_default(f) and f.name not in given:  # the value shown is the value used
            assert getattr(loaded, f.name) == default_of(f), (name, f.name)
    if "threads" in options:  # auto subtracts the loader's workers only where the command starts them
        threads_help = " ".join(options["threads"].get_help_record(ctx)[1].split())
        assert ("--num-workers" in threads_help) == ("num_workers" in names), (name, threads_help)
        assert "loader workers" not in threads_help


# -- the README's path, for real (run once for the session: tests/readmepath.py) ----------------------
@pytest.mark.slow
def test_the_readme_path_runs_with_no_warning_and_writes_what_it_says(readme_path):
    work = readme_path["dir"]
    for made in ("run1.store", "student-init/config.json", "student/training_report.json", "report.html",
                 "t.parquet", "potstill-demo/report.json", "potstill-demo/report.png"):
        assert (work / made).exists(), made  # each default output where --help says it goes


@pytest.mark.slow
def test_generate_records_the_defaults_help_shows(readme_path):
    from potstill.store import open_store

    manifest = open_store(str(readme_path["dir"] / "run1.store")).manifest
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    targets = manifest.targets
    recorded = {"targets": targets.kind, "samples": targets.samples, "sampler": targets.sampler,
                "seed": targets.seed, "logprob_dtype": targets.logprob_dtype,
                **{k: v for k, v in manifest.generation.items() if k in fields}}
    checked = 0
    for key, value in recorded.items():
        if literal_default(fields[key]):
            assert value == fields[key].default, key
            checked += 1
    assert checked >= 8
    assert targets.codec == shown_default(fields["codec"]).split(";")[0]  # "compact; none with --targets topk"
    assert manifest.hidden.layers == []  # --hidden-layers: none
    assert manifest.generation["fields"] == {"id": "id", "prompt": "prompt", "messages": "messages",
                                             "completion": "completion"}


@pytest.mark.slow
def test_train_eval_and_student_init_record_the_defaults_help_shows(readme_path):
    work = readme_path["dir"]
    report = json.loads((work / "student" / "training_report.json").read_text())
    for f, _ in fields_of(TrainConfig):
        if literal_default(f):
            assert report["settings"][f.name] == default_of(f), f.name
    assert report["loader"]["num_workers"] == TrainConfig().num_workers
    assert "teachers" not in report  # --teacher-weights: equal, one store
    # eval: --eval-fraction is the training report's, as its help says; the other defaults as shown
    evaluated = readme_path["eval"]
    assert evaluated["eval_fraction"] == report["settings"]["eval_fraction"]
    assert evaluated["records"] == report["final_eval"]["records"]
    assert shown_default(next(f for f in dataclasses.fields(EvalConfig) if f.name == "eval_fraction")).startswith(
        "the model's training report")
    # student init: float32, kv heads in the teacher's ratio, the kept layers
    made = json.loads((work / "student-init" / "student_init.json").read_text())
    assert made["dtype"] == "float32" and made["layers"] == [0]
    config = json.loads((work / "student-init" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


@pytest.mark.slow
def test_the_demo_records_the_defaults_help_shows(readme_path):
    from potstill.cli.demo.run import DemoConfig

    report = json.loads((readme_path["dir"] / "potstill-demo" / "report.json").read_text())
    for f, _ in fields_of(DemoConfig):
        assert report["settings"][f.name] == DEMO_TYPED.get(f.name, f.default), f.name
    assert report["settings"]["threads"] == auto_threads()  # --threads auto, as its help counts it
