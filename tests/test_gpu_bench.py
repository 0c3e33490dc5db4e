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


@pytest.mark.slow
def test_gpu_sh_verify_times_verify_against_hashing_with_the_jobs_asked(tmp_path):
    """`bench/gpu.sh --verify` (verify_speed.py on the GPU machine's cores): every store verified sound
    before it is timed, each job count asked for timed, the medians written with the core count."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--verify", "--records", "16",
                           "--length", "64", "--short", "16", "--rounds", "1", "--jobs", "2", "1"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["cores"] >= 1 and report["shard_records"] == 1024
    assert set(report["seconds"]) == {"sampled64-compact", "top64", "top64-packed", "sampled64-compact-short16"}
    for store, row in report["seconds"].items():
        assert {"hash", "verify --jobs 1", "verify --jobs 2", "verify --quick"} <= set(row), store
        assert all(t > 0 for t in row.values()), store
    assert "verify --jobs 2" in proc.stdout
