"""The README's path run once for the session (the `readme_path` fixture in conftest.py): its commands
with only their required flags, as a new user types them first, each with potstill's warnings as errors.
Several test files check what these runs wrote; a test that changes the output works on a copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import prompt_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m potstill.cli.main`, with every warning raised from potstill's own modules an error
# (a library's warning attributed to our call, through its stacklevel, counts as ours).
STRICT = ("import runpy, sys, warnings; warnings.filterwarnings('error', module=r'potstill(\\.|$)'); "
          "sys.argv = ['potstill', *sys.argv[1:]]; runpy.run_module('potstill.cli.main', run_name='__main__')")
# What a warning looks like in a run's output, whatever printed it (Python's warnings, a library's logger).
WARNING_WORDS = ("Warning:", "warning:", "WARNING", "deprecated", "Deprecat")
# The demo's sizes the path types (the rest are its defaults)
DEMO_TYPED = {"train_problems": 24, "eval_problems": 5, "student_steps": 2}


def strict_cli(args: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A `potstill` command with potstill's warnings as errors; its output must hold no warning."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", STRICT, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    assert done.returncode == 0, (args, done.stderr[-3000:])
    for line in (done.stdout + done.stderr).splitlines():
        assert not any(word in line for word in WARNING_WORDS), (args, line)
    return done


def run_readme_path(work: Path, teacher: str) -> dict[str, Any]:
    """generate, student init, train, eval, the store commands and a small demo, in `work`; returns
    {"dir": work, "eval": eval's JSON, "demo_stdout": what the demo printed}."""
    write_jsonl(str(work / "prompts.jsonl"), prompt_rows(24, seed=4))
    out: dict[str, Any] = {"dir": work}
    strict_cli(["generate", "--teacher", teacher, "--prompts", "prompts.jsonl", "--out", "run1.store"], str(work))
    strict_cli(["student", "init", "--teacher", teacher, "--layers", "1", "--out", "student-init"], str(work))
    strict_cli(["train", "--store", "run1.store", "--student", "student-init", "--out", "student"], str(work))
    out["eval"] = json.loads(strict_cli(["eval", "--store", "run1.store", "--student", "student", "--json"],
                                        str(work)).stdout)
    for args in (["store", "info", "run1.store"], ["store", "verify", "run1.store"],
                 ["store", "report", "run1.store"], ["store", "export", "run1.store", "--to", "t.parquet"]):
        strict_cli(args, str(work))
    demo = [arg for name, value in DEMO_TYPED.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    out["demo_stdout"] = strict_cli(["demo", *demo], str(work)).stdout
    return out
