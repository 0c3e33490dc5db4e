"""The CLI explains itself and suits a shared CPU: `--threads` everywhere (auto from the CPUs this process
may use), defaults shown one way, one flag vocabulary with the old spellings still accepted, and
`potstill jobs` on the base install."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import click
import pytest
import typer
from common import prompt_rows, write_jsonl
from genhelpers import run_cli
from typer.testing import CliRunner

from potstill.cli.main import app
from potstill.cli.options import UsageErrorBase
from potstill.cli.threads import auto_threads, cgroup_cpu_limit, resolve_threads, usable_cpus
from potstill.store.errors import PotstillError
from potstill.student_train.config import TrainConfig
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.service.settings import ServeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- usable CPUs ---------------------------------------------------------------------------------
def fake_cgroup(tmp_path, proc_line: str, files: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return str(root), str(proc)


@pytest.mark.parametrize("proc_line,files,expected", [
    ("0::/job", {"job/cpu.max": "150000 100000", "cpu.max": "max 100000"}, 1.5),
    ("0::/a/b", {"a/b/cpu.max": "max 100000", "a/cpu.max": "300000 100000"}, 3.0),  # a parent's quota counts
    ("0::/a/b", {"a/b/cpu.max": "50000 100000", "a/cpu.max": "300000 100000"}, 0.5),  # the smallest wins
    ("0::/job", {"job/cpu.max": "max 100000"}, None),
    ("0::/gone", {"cpu.max": "200000 100000"}, 2.0),  # a container: its own cgroup is the mount's root
    ("4:cpu,cpuacct:/docker/x", {"cpu/docker/x/cpu.cfs_quota_us": "250000", "cpu/docker/x/cpu.cfs_period_us": "100000"},
     2.5),
    ("4:cpu,cpuacct:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("0::/job", {"job/cpu.max": "garbage"}, None),
])
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2_files(tmp_path, proc_line, files, expected):
    root, proc = fake_cgroup(tmp_path, proc_line, files)
    assert cgroup_cpu_limit(root, proc) == expected


def test_a_quota_caps_usable_cpus_at_its_floor_and_never_below_one(tmp_path):
    root, proc = fake_cgroup(tmp_path, "0::/job", {"job/cpu.max": "50000 100000"})
    assert usable_cpus(root, proc) == 1
    root, proc = fake_cgroup(tmp_path / "big", "0::/job", {"job/cpu.max": "100000000 100000"})
    assert usable_cpus(root, proc) == len(os.sched_getaffinity(0))  # a quota above the CPUs changes nothing


def test_threads_values():
    assert resolve_threads("3") == 3 and resolve_threads(2) == 2
    assert auto_threads(0, environ={"OMP_NUM_THREADS": "5"}) == 5  # the user's own setting wins
    assert auto_threads(10_000, environ={}) == 1
    for bad in ("0", "-1", "two", "99999", str(4 * len(os.sched_getaffinity(0)) + 1)):
        with pytest.raises(PotstillError, match="--threads"):
            resolve_threads(bad)
    assert resolve_threads(str(4 * len(os.sched_getaffinity(0)))) == 4 * len(os.sched_getaffinity(0))


def test_an_absurd_thread_count_is_refused_in_one_line_before_torch_starts(tmp_path, tiny_teacher_dir):
    """--threads 99999 used to reach OpenMP and the tokenizers' pool: a Rust panic, then a segfault."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=5))
    cpus = len(os.sched_getaffinity(0))
    for command in (["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", str(tmp_path / "s"),
                     "--device", "cpu", "--no-progress"],
                    ["train", "--store", str(tmp_path / "s"), "--student", tiny_teacher_dir, "--out", str(tmp_path / "o")]):
        result = subprocess.run([sys.executable, "-m", "potstill.cli.main", *command, "--threads", "99999"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert (result.returncode, result.stderr.strip().splitlines()) == (1, [
            f"error: --threads '99999': expected a whole number from 1 to {4 * cpus} (4 per CPU this process may "
            "use) or auto"]), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "o")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_threads_reach_torch_auto_follows_the_affinity_and_openmp_waits_passively(tmp_path, tiny_teacher_dir):
    """A real `potstill generate` under `taskset -c 0`: auto gives torch 1 thread; `--threads 3` gives 3;
    OpenMP was told to sleep while it waits; transformers prints no loading bars."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=5))
    store = str(tmp_path / "s")
    script = textwrap.dedent(f"""
        import json, os, sys
        from potstill.cli.main import app
        from potstill.cli.threads import usable_cpus
        import torch
        seen = {{"usable": usable_cpus()}}
        base = ["generate", "--teacher", {tiny_teacher_dir!r}, "--prompts", {prompts!r}, "--out", {store!r},
                "--device", "cpu"]
        for threads in ("auto", "3"):
            app(base + ["--threads", threads], standalone_mode=False)
            seen[threads] = torch.get_num_threads()
        seen["wait"] = os.environ.get("OMP_WAIT_POLICY")
        print("RESULT " + json.dumps(seen))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": ROOT}, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert seen == {"usable": 1, "auto": 1, "3": 3, "wait": "PASSIVE"}
    assert "Loading weights" not in result.stderr and "generate:" in result.stderr  # only potstill's own bar


# -- help ----------------------------------------------------------------------------------------
def command(path: list[str]) -> tuple[click.Command, click.Context]:
    cmd: click.Command = typer.main.get_command(app)
    ctx = click.Context(cmd, info_name="potstill")
    for name in path:
        cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    return cmd, ctx


def help_of(path: list[str]) -> dict[str, str]:
    """--flag -> its help line (defaults and [required] included), as --help prints them."""
    cmd, ctx = command(path)
    out = {}
    for param in cmd.params:
        if param.param_type_name == "option" and not getattr(param, "hidden", False):
            record = param.get_help_record(ctx)
            if record:
                out[param.opts[0]] = record[1]
    return out


@pytest.mark.parametrize("path,config_cls", [(["generate"], GenerateConfig), (["train"], TrainConfig),
                                             (["serve"], ServeConfig)])
def test_every_setting_with_a_default_shows_it(path, config_cls):
    shown = help_of(path)
    checked = 0
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if flag not in shown or default is None or default is dataclasses.MISSING or default == "":
            continue
        assert "[default: " in shown[flag], (flag, shown[flag])
        checked += 1
    assert checked >= 10
    assert all("(default:" not in text for text in shown.values())  # one format only


def test_help_shows_defaults_as_typed_and_marks_required_options():
    train = help_of(["train"])
    assert train["--answer-marker"].endswith("[default: ' [answer]']")
    assert train["--lr"].endswith("[default: 0.0001]") and train["--tail"].endswith("[default: tail]")
    assert train["--threads"].endswith("[default: auto]")
    for flag in ("--store", "--student", "--out"):
        assert "[required" in train[flag]
    generate = help_of(["generate"])
    assert "[required" in generate["--out"] and "[required" in generate["--teacher"]
    assert generate["--top-k"].endswith("[default: 64]")
    evaluate = help_of(["eval"])
    assert "[required]" in evaluate["--student"] and evaluate["--batch-size"].endswith("[default: 8]")
    for path in (["generate"], ["train"], ["eval"], ["demo"], ["serve"]):
        assert help_of(path)["--threads"].endswith("[default: auto]"), path
    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output  # as printed: nothing eaten
    assert "[default: ' [answer]']" in text and "[required, here or in --config]" in text


# -- one vocabulary, old spellings kept ----------------------------------------------------------
def invoke(args: list[str]) -> str:
    """Run a command in-process; its one-line error (or '' on success)."""
    try:
        app(args, standalone_mode=False)
    except PotstillError as e:
        return str(e)
    except UsageErrorBase as e:  # a flag typer refused
        return e.format_message()
    return ""


def test_old_flag_spellings_still_work_but_are_hidden(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=6))
    old = str(tmp_path / "old")
    assert invoke(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--store", old, "--device", "cpu",
                   "--no-progress", "--threads", "1"]) == ""
    assert os.path.exists(os.path.join(old, "manifest.json"))
    assert "--store" not in help_of(["generate"]) and "--model" not in help_of(["eval"])
    both = invoke(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", old, "--store", "x"])
    assert both == "--out and --store (its old spelling) were both given, with different values"
    # eval: --model is the old --student; the store is then opened (and found missing), so the flag was taken
    missing = str(tmp_path / "missing")
    assert "No such option" not in invoke(["eval", "--store", missing, "--model", old, "--threads", "1"])
    assert invoke(["eval", "--store", missing]) == "--student is required"
    # jobs submit: --store is the old --out; the spec is complete, only the server is missing
    unreachable = invoke(["jobs", "submit", "--server", "http://127.0.0.1:9", "--prompts", prompts, "--store", old])
    assert unreachable.startswith("cannot reach the potstill service at http://127.0.0.1:9")


# -- potstill jobs / serve on the base install ---------------------------------------------------
def test_jobs_needs_nothing_from_the_serve_extra_and_serve_names_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # as if `pip install potstill` without [serve]
        "import sys\nfor name in ('fastapi', 'uvicorn', 'httpx', 'starlette'):\n    sys.modules[name] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    jobs = run_cli(["jobs", "list", "--server", "http://127.0.0.1:9"], env=env)
    assert jobs.returncode == 1 and "Traceback" not in jobs.stderr, jobs.stderr
    assert jobs.stderr.strip().splitlines()[-1] == (  # (a library's own warning may come first)
        "error: cannot reach the potstill service at http://127.0.0.1:9 ([Errno 111] Connection refused); "
        "is `potstill serve` running there?")
    serve = run_cli(["serve", "--teacher", "x", "--state", str(tmp_path / "state")], env=env)
    assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert serve.stderr.strip().splitlines()[-1] == "error: potstill serve needs fastapi and uvicorn: pip install 'potstill[serve]'"
    assert not os.path.exists(tmp_path / "state")
