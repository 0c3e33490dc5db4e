"""An output folder nothing can be written in is refused in one line before any model loads."""

from __future__ import annotations

import os

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import run_cli, run_main


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_generate_refuses_an_unwritable_out_before_the_teacher_loads(tmp_path, tiny_teacher_dir, where) -> None:
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2))
    if where == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        out = str(tmp_path / "a-file" / "store")
    else:
        out = "/proc/potstill-store"  # not writable, even by root
    run = run_cli if where == "under-a-file" else run_main  # (the command as a process once)
    proc = run(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", out,
                    "--device", "cpu", "--no-progress"])
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert out in errors[0] and ("write" in errors[0] or "which is a file" in errors[0]), errors[0]
    assert "Loading weights" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(out)
