"""bench/gpu.py end to end at tiny sizes on the CPU (the GPU run itself is measured on a GPU only).

The capture steps only (--skip-train): the training step is bench/train_step.py's, and the whole
run with it, `python bench/gpu.py --device cpu --quick`, takes ~15 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_bench_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter: minutes
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--quick",
                           "--skip-train", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert set(rows) == {"bare", "capture torch", "store"}  # no CUDA: no fused rows
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert rows["store"]["of_bare"] > 0 and rows["store"]["kernel"] == "torch"
    # what a token costs in the store: top-8 ids + log-probs, token + tail, 3 hidden layers of 32 bf16
    assert rows["store"]["bytes_per_token"] >= 8 * (4 + 2) + 3 * 32 * 2  # (+ file overheads, large at 48 tokens)
    assert report["fused_check"] == {"skipped": "the fused kernel needs CUDA (or TRITON_INTERPRET=1) and Triton"}
    assert report["kernel_per_chunk"] == report["fused_check"]
    assert report["hidden_layers"] == [1, 2, 4] and report["goals_met"]["store of_bare"] is False
    assert "| bare |" in proc.stdout


# As on the GPU machine, which installs nothing: potstill's installed finder (the editable install's)
# is taken away, so only bench/gpu.py's own mapping of the checkout's folders can import potstill.
UNINSTALLED = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") + repr(f)).lower()]
try:
    import potstill.store
    raise SystemExit("potstill is still importable: this run would not show an uninstalled checkout")
except ModuleNotFoundError:
    pass
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, {bench!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_bench_runs_from_a_checkout_where_potstill_is_not_installed(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    script = UNINSTALLED.format(bench=os.path.join(ROOT, "bench"))
    proc = subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu",
                           "--quick", "--skip-train", "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["rows"]["store"]["tokens_per_s"] > 0
