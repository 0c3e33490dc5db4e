"""Helpers shared by the teacher-generation tests (tests/test_generate*.py, test_vllm_adapter.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np


def config(teacher: str, prompts: str, store: str, **overrides: Any):
    from potstill.teacher_gen.config import GenerateConfig

    # The settings these tests were written for, unless a test asks for others (`potstill generate`'s
    # own defaults are sampled targets, systematic N = 64, compact): most check top-k capture exactly.
    base = {"teacher": teacher, "prompts": prompts, "store": store, "device": "cpu", "progress": False,
            "targets": "topk", "samples": 50, "sampler": "iid", "codec": "none"}
    base.update(overrides)
    return GenerateConfig.build(**base)


def reference_logprobs(model: Any, input_ids: np.ndarray) -> np.ndarray:
    """Full fp32 log-softmax of the model's own logits, [n - 1, V]: row p is the distribution of
    token p + 1. The direct reference the chunked capture must match."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids[None].astype(np.int64))).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def reference_log_tail(model: Any, input_ids: np.ndarray, top_ids: np.ndarray, score_start: int) -> np.ndarray:
    """float64 log of the teacher's mass outside `top_ids` ([S, K], −1 = empty) at the scored
    positions, from the model's own logits widened to float64: a direct sum over the other tokens."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids[None].astype(np.int64))).logits[0, score_start - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1).numpy()
    outside = np.ones(logp.shape, dtype=bool)
    rows = np.repeat(np.arange(len(top_ids)), top_ids.shape[1])
    keep = top_ids.reshape(-1) >= 0
    outside[rows[keep], top_ids.reshape(-1)[keep]] = False
    with np.errstate(divide="ignore"):
        return np.log(np.where(outside, np.exp(logp), 0.0).sum(-1))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of observed `counts` against `probs` (bins with expectation < 5 merged),
    and its degrees of freedom."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def assert_topk_close(ids_a: np.ndarray, lp_a: np.ndarray, ids_b: np.ndarray, lp_b: np.ndarray,
                      atol: float) -> None:
    """Same top-k up to the order of (near-)ties: the sorted values agree, every id on both sides
    has the same log-prob on both, and an id on one side only sits at the top-k boundary."""
    lp_a = np.asarray(lp_a, dtype=np.float32)
    lp_b = np.asarray(lp_b, dtype=np.float32)
    assert ids_a.shape == ids_b.shape
    assert np.array_equal(np.isfinite(lp_a), np.isfinite(lp_b))
    finite = np.isfinite(lp_a)
    np.testing.assert_allclose(lp_a[finite], lp_b[finite], atol=atol, rtol=0)
    for r in range(len(ids_a)):
        a = {int(i): float(v) for i, v in zip(ids_a[r], lp_a[r], strict=True) if np.isfinite(v)}
        b = {int(i): float(v) for i, v in zip(ids_b[r], lp_b[r], strict=True) if np.isfinite(v)}
        for i in a.keys() & b.keys():
            assert abs(a[i] - b[i]) <= atol, f"row {r}: id {i} has {a[i]} vs {b[i]}"
        boundary = min(a.values())
        for i in a.keys() ^ b.keys():
            value = a.get(i, b.get(i))
            assert value <= boundary + atol, f"row {r}: id {i} ({value}) is in only one top-k, above the boundary"


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """`potstill ARGS` through the command's own entry point, in this process: its output, its one-line
    errors and its exit code as `run_cli` gives them, without a process's seconds of imports. For the
    further cases of a behaviour a real process (`run_cli`) already shows once."""
    import contextlib
    import io

    from potstill.cli.main import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = ["potstill", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["potstill", *args], code, out.getvalue(), err.getvalue())


def popen_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "potstill.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
