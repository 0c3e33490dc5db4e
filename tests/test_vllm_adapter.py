"""The vLLM backend's parts that need no engine: how the worker extension keeps a request's rows
(`vllm_capture._Rows`), the engine's defaults and flags, and the manifest of a vLLM store. The
captures themselves are checked against the HF backend with the real engine (test_vllm_engine.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from genhelpers import config

from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.vllm_capture import _Rows, _take_rows


def _rows(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, 3)


def test_rows_come_back_in_position_order_and_a_recomputation_replaces_what_follows_it():
    rows = _Rows()
    assert rows.stacked() is None
    rows.add(4, _rows(4, 3))  # prefill from position 4 on (the earlier positions are not kept)
    rows.add(7, _rows(7, 1))  # decoding steps
    rows.add(8, _rows(8, 1))
    assert rows.stacked()[:, 0].tolist() == [4, 5, 6, 7, 8]
    # preempted and recomputed from position 6: its rows replace those from 6 on, in place
    rows.add(6, _rows(6, 2) + 100)
    assert rows.stacked()[:, 0].tolist() == [4, 5, 106, 107]
    rows.add(2, _rows(2, 3))  # a recomputation from before the first kept row replaces them all
    assert rows.stacked()[:, 0].tolist() == [2, 3, 4]


def test_the_logits_rows_of_captured_requests_are_taken_in_the_batch_order():
    logits = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    for rows in ([0, 1, 2, 3, 4, 5], [2, 3], [4], [0, 2, 5], [3, 1]):
        assert torch.equal(_take_rows(logits, rows), logits[rows]), rows


def test_a_vllm_store_forms_its_tails_directly(tmp_path):
    from potstill.teacher_gen.runner import target_spec

    for backend in ("vllm", "hf"):
        spec = target_spec(config("t", "p.jsonl", str(tmp_path / "s"), backend=backend, targets="both"), 384)
        assert spec.tail_logprob == "direct"
    assert target_spec(config("t", "p.jsonl", str(tmp_path / "s"), backend="vllm", targets="sampled"), 384
                       ).tail_logprob is None


def test_engine_defaults_on_cpu_and_gpu(monkeypatch, tmp_path):
    """vLLM's CPU build gets eager mode, a 1 GiB KV cache and the engine in-process; a GPU gets vLLM's
    usual memory share; the user's flags and environment win."""
    from potstill.teacher_gen.vllm_backend import engine_defaults

    def cfg(**kw):
        return config("t", "p", "s", backend="vllm", **kw)

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert engine_defaults(cfg(), cpu=True) == {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_defaults(cfg(), cpu=False) == {"enforce_eager": False, "gpu_memory_utilization": 0.9}
    assert engine_defaults(cfg(enforce_eager=False, gpu_memory_utilization=0.2), cpu=True) == {
        "enforce_eager": False, "gpu_memory_utilization": 0.2}
    assert engine_defaults(cfg(enforce_eager=True, gpu_memory_utilization=0.5), cpu=False) == {
        "enforce_eager": True, "gpu_memory_utilization": 0.5}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # vLLM reads it itself
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert engine_defaults(cfg(), cpu=True) == {"enforce_eager": True}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_enforce_eager_and_memory_flags_reach_the_config(tmp_path):
    from typer.testing import CliRunner

    from potstill.cli.main import app
    from potstill.teacher_gen.service.settings import LOAD_FIELDS, ServeConfig

    assert "enforce_eager" in LOAD_FIELDS
    assert ServeConfig.build(teacher="t", enforce_eager="true").enforce_eager is True
    with pytest.raises(GenerateError, match="--gpu-memory-utilization must be in"):
        config("t", "p", "s", gpu_memory_utilization=1.5)
    # the flags parse; the run then stops, in one line, at the missing teacher (or, where vLLM is not
    # installed, at that: the backend is checked first)
    result = CliRunner().invoke(app, ["generate", "--teacher", str(tmp_path / "none"), "--prompts", "p", "--out", "s",
                                      "--backend", "vllm", "--targets", "topk", "--no-enforce-eager",
                                      "--gpu-memory-utilization", "0.5"])
    message = str(result.exception)
    assert isinstance(result.exception, GenerateError)
    assert "cannot load its config" in message or "vLLM is not installed here" in message, message
