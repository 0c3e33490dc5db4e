"""Each process's own device under a launcher (torchrun's LOCAL_RANK), for the HF backend and vLLM.

The rules are pure functions of the flag, the visible CUDA device count and the environment, so
they are checked here for boxes with GPUs; a real CPU run checks that LOCAL_RANK changes nothing there.
"""

from __future__ import annotations

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import config

from potstill.store import open_store
from potstill.teacher_gen.devices import resolve_device, vllm_visible_devices
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate


@pytest.mark.parametrize(("flag", "count", "env", "want"), [
    ("auto", 0, {}, "cpu"),
    ("auto", 0, {"LOCAL_RANK": "3"}, "cpu"),  # no GPU: the rank changes nothing
    ("cpu", 8, {"LOCAL_RANK": "3"}, "cpu"),
    ("auto", 8, {}, "cuda"),
    ("cuda", 8, {}, "cuda"),
    ("auto", 8, {"LOCAL_RANK": "0"}, "cuda:0"),
    ("auto", 8, {"LOCAL_RANK": "7"}, "cuda:7"),
    ("cuda", 8, {"LOCAL_RANK": "5"}, "cuda:5"),
    ("cuda:2", 8, {"LOCAL_RANK": "5"}, "cuda:2"),  # an explicit index is kept
    ("auto", 2, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}, "cuda:1"),  # indices of the visible ones
])
def test_resolve_device(flag, count, env, want):
    assert resolve_device(flag, count, env) == want


@pytest.mark.parametrize(("flag", "count", "env", "message"), [
    ("auto", 4, {"LOCAL_RANK": "4"}, "LOCAL_RANK=4 but only 4 CUDA device(s) are visible"),
    ("cuda", 2, {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"},
     "LOCAL_RANK=2 but only 2 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES=0,1)"),
    ("auto", 4, {"LOCAL_RANK": "one"}, "LOCAL_RANK='one' is not a process index"),
    ("cuda:4", 4, {}, "--device cuda:4: only 4 CUDA device(s) are visible"),
    ("cuda", 0, {"LOCAL_RANK": "0"}, "CUDA is not available"),
    ("gpu", 4, {}, "is not a torch device"),
])
def test_resolve_device_errors_name_the_rank_and_the_count(flag, count, env, message):
    with pytest.raises(GenerateError) as err:
        resolve_device(flag, count, env)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("flag", "count", "env", "tp", "want"), [
    ("auto", 0, {"LOCAL_RANK": "1"}, 1, None),  # vLLM on CPU
    ("auto", 8, {}, 1, None),  # one process: vLLM's own choice (the first GPUs)
    ("cpu", 8, {"LOCAL_RANK": "1"}, 1, None),
    ("auto", 8, {"LOCAL_RANK": "3"}, 1, "3"),
    ("cuda", 8, {"LOCAL_RANK": "3"}, 2, "6,7"),  # rank r takes GPUs r·tp … r·tp + tp − 1
    ("auto", 4, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b,GPU-c,GPU-d"}, 2, "GPU-c,GPU-d"),
    ("cuda:5", 8, {}, 1, "5"),
    ("cuda:1", 3, {"CUDA_VISIBLE_DEVICES": "2,5,7", "LOCAL_RANK": "0"}, 1, "5"),
])
def test_vllm_visible_devices(flag, count, env, tp, want):
    assert vllm_visible_devices(flag, count, env, tp) == want


def test_vllm_ranks_beyond_the_gpus_are_refused():
    with pytest.raises(GenerateError, match=r"LOCAL_RANK=2 with --tensor-parallel-size 2 needs GPUs 4..5, but only 4"):
        vllm_visible_devices("auto", 4, {"LOCAL_RANK": "2"}, 2)


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_local_rank_on_a_cpu_machine_runs_on_the_cpu(tmp_path, tiny_teacher_dir, monkeypatch, device):
    """As torchrun would start it: LOCAL_RANK set, no GPU. The run works and writes its records."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    monkeypatch.setenv("LOCAL_RANK", "1")
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=5))
    summary = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), device=device))
    assert summary.records == 3 and not summary.errors
    assert len(list(open_store(str(tmp_path / "s")).iter_records())) == 3
