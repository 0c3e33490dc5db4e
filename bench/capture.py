"""Capture throughput: potstill's capture (with the store written) against the bare teacher forward.

A Llama-shaped teacher is built from a config with random weights (sizes are flags; the defaults
match the anchor run: hidden 2048, 16 layers, vocab 128,256, 8 x 1024 tokens per batch), and the
same random batches go through

  bare      model(input_ids).logits                         (what any scoring pass costs)
  capture   HFTeacher.score: hooks on the hidden layers, chunked LM head, top-k, the fp32
            logsumexp outside the top-k (the direct log tail), pinned copies on a side stream;
            results collected, nothing written
  store     capture + the background writer filling a real store (Arrow + Zarr, committed)
  naive     (--naive) full fp32 log_softmax, topk, the tail, output_hidden_states, blocking copies

--ablate adds the capture without compile, without the block top-k, and with the previous
(format 1.0) tail: one logsumexp over every logit and 1 − Σ exp(top-k), no masked reduction.

It prints one JSON object (also written to --out, or $OUT/capture.json when $OUT is set).

    python bench/capture.py                                   # GPU, anchor sizes
    python bench/capture.py --device cpu --hidden 64 --layers 4 --heads 4 --kv-heads 2 \\
        --intermediate 128 --vocab 4096 --batch 2 --seq 128 --batches 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.teacher_gen.capture import make_logsumexp, resolve_layers
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.encode import Encoded
from potstill.teacher_gen.hf_backend import HFTeacher
from potstill.teacher_gen.jobs import ScoreJob
from potstill.teacher_gen.model_info import TeacherSpec
from potstill.teacher_gen.prompts import SourceItem
from potstill.teacher_gen.runner import RecordBuilder
from potstill.teacher_gen.writer import WriterPool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batches", type=int, default=10, help="timed batches")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--hidden-layers", default="auto",
                   help="HF indices of the stored hidden states (auto: L/4, L/2 and -1, i.e. 4,8,16 for 16 layers)")
    p.add_argument("--chunk-positions", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--store", default=None, help="store folder (default: a temporary one, removed after)")
    p.add_argument("--shard-records", type=int, default=16)
    p.add_argument("--writer-threads", type=int, default=GenerateConfig.writer_threads)
    p.add_argument("--no-compile", action="store_true", help="eager logsumexp (no torch.compile)")
    p.add_argument("--ablate", action="store_true",
                   help="also time capture without compile / block top-k / with the previous (1 − Σ) tail")
    p.add_argument("--naive", action="store_true", help="also time the naive capture")
    p.add_argument("--rounds", type=int, default=3, help="--ablate: rounds of the variants in turn")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_teacher(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_batches(args: argparse.Namespace, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32) for _ in range(count)]


def jobs_of(batch: np.ndarray, tag: str) -> list[ScoreJob]:
    # Every token scored and every hidden row kept, as in the anchor's capture.
    jobs = []
    for r, row in enumerate(batch):
        encoded = Encoded(SourceItem(id=f"{tag}-{r}", line=r), prompt_ids=row[:1])
        jobs.append(ScoreJob(encoded.item.id, encoded, row, score_start=1, hidden_start=0))
    return jobs


def run_capture(teacher: HFTeacher, batches: list[np.ndarray], tag: str,
                hand_over: Callable[[list[ScoreJob], list], None]) -> None:
    """The runner's loop: launch batch i+1 before collecting batch i."""
    waiting = None
    for i, batch in enumerate(batches):
        jobs = jobs_of(batch, f"{tag}{i}")
        launched = (jobs, teacher.score(jobs))
        if waiting is not None:
            hand_over(waiting[0], waiting[1]())
        waiting = launched
    if waiting is not None:
        hand_over(waiting[0], waiting[1]())


def previous_tail(lse: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> Callable:
    """The format 1.0 capture's reductions, for timing only: one logsumexp over every logit (its
    tail was 1 − Σ exp(top-k), no second look at the logits). The values it leads to are wrong
    for the current code, which expects the logsumexp outside the top-k; only its cost counts."""
    return lambda logits, top_idx: lse(logits, None)


def naive_capture(model: Any, batch: torch.Tensor, k: int, layers: list[int]) -> None:
    out = model(input_ids=batch, output_hidden_states=True)
    lp = torch.log_softmax(out.logits.float(), dim=-1)
    values, ids = lp.topk(k, dim=-1)
    tail = torch.logsumexp(lp.scatter_(-1, ids, float("-inf")), dim=-1)
    hidden = torch.stack([out.hidden_states[i] for i in layers], dim=2)
    for t in (values.half(), ids.int(), tail, hidden):
        t.cpu()


def check_against_reference(model: Any, teacher: HFTeacher, batch: np.ndarray, k: int) -> dict[str, float]:
    """Top-k agreement with a full fp32 log_softmax of the model's own logits, on one batch."""
    captures = teacher.score(jobs_of(batch, "check"))()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch.astype(np.int64)).to(teacher.device)).logits[:, :-1]
        ref_lp, ref_ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    got_ids = np.stack([c.targets.ids for c in captures])
    got_lp = np.stack([c.targets.logprobs for c in captures]).astype(np.float32)
    return {
        "topk_id_agreement": float((got_ids == ref_ids.int().cpu().numpy()).mean()),
        "max_abs_logprob_diff": float(np.abs(got_lp - ref_lp.cpu().numpy()).max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    tokens_per_batch = args.batch * args.seq

    model = build_teacher(args, device, dtype)
    wanted = ([args.layers // 4, args.layers // 2, -1] if args.hidden_layers == "auto"
              else [int(x) for x in args.hidden_layers.split(",") if x])
    layers = resolve_layers(wanted, args.layers)
    config = GenerateConfig.build(
        teacher="bench-random-llama", prompts="-", store="-", device=str(device), targets="topk", top_k=args.top_k,
        chunk_positions=args.chunk_positions, compile=not args.no_compile and device.type == "cuda",
        batch_tokens=tokens_per_batch,
    )
    info = TeacherInfo(name_or_path="bench-random-llama", config_hash="sha256:bench", dtype=dtype_name,
                       architecture="LlamaForCausalLM", num_hidden_layers=args.layers, hidden_size=args.hidden,
                       vocab_size=args.vocab)
    spec = TeacherSpec(model.config, info, dtype_name, args.layers, args.hidden, args.vocab)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    teacher = HFTeacher(config, spec, tokenizer, layers, model=model)

    warm = make_batches(args, args.warmup, seed=1)
    batches = make_batches(args, args.batches, seed=2)
    total_tokens = tokens_per_batch * len(batches)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": dtype_name, "torch": torch.__version__,
        "teacher_params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "top_k": args.top_k,
        "hidden_layers": layers, "batch": f"{args.batch} x {args.seq}", "timed_batches": args.batches,
        "compile": bool(config.compile), "block_topk": teacher.block, "writer_threads": args.writer_threads,
    }

    # bare forward
    with torch.inference_mode():
        device_batches = [torch.from_numpy(b.astype(np.int64)).to(device) for b in warm + batches]
        for b in device_batches[: len(warm)]:
            model(input_ids=b)
        seconds = timed(device, lambda: [model(input_ids=b).logits for b in device_batches[len(warm):]])
    result["bare_tok_s"] = round(total_tokens / seconds)

    # capture, results collected but not written
    def discard(jobs: list[ScoreJob], captures: list) -> None:
        pass

    run_capture(teacher, warm, "warm", discard)
    seconds = timed(device, lambda: run_capture(teacher, batches, "cap", discard))
    result["capture_tok_s"] = round(total_tokens / seconds)

    if args.ablate:  # variants timed in turn, round after round; medians, and ratios within a round
        fast = (teacher.logsumexp, teacher.block)
        variants = {
            "capture": fast,
            "capture_eager_lse": (make_logsumexp(teacher.transform), teacher.block),
            "capture_plain_topk": (teacher.logsumexp, None),
            "capture_previous_tail": (previous_tail(teacher.logsumexp), teacher.block),
        }
        seconds_of: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (lse, block) in variants.items():
                teacher.logsumexp, teacher.block = lse, block
                if r == 0:
                    run_capture(teacher, warm, "warm", discard)
                seconds_of[name].append(timed(device, lambda: run_capture(teacher, batches, "cap", discard)))
        teacher.logsumexp, teacher.block = fast
        for name, secs in seconds_of.items():
            result[f"ablate_{name}_tok_s"] = round(total_tokens / float(np.median(secs)))
        ratios = [p / c for p, c in zip(seconds_of["capture_previous_tail"], seconds_of["capture"], strict=True)]
        result["capture_over_previous_tail"] = round(float(np.median(ratios)), 3)  # > 1: the new capture is faster

    # capture + store
    store_dir = args.store or tempfile.mkdtemp(prefix="potstill-bench-")
    if os.path.exists(os.path.join(store_dir, "manifest.json")):
        raise SystemExit(f"{store_dir} already holds a store; give a new folder")
    manifest = StoreManifest(
        teacher=info,
        tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=args.vocab),
        targets=TargetSpec(k=args.top_k),
        hidden=HiddenSpec([HiddenLayer(i, args.hidden, "bfloat16", post_norm=i == args.layers) for i in layers]),
        generation={"bench": True},
    )
    store = create_store(store_dir, manifest, {"tokenizer.json": b"{}"})
    writer = WriterPool(store, "bench", RecordBuilder(config, tokenizer), threads=args.writer_threads,
                        shard_records=args.shard_records, shard_bytes=1 << 30, max_batches=config.queue_batches)

    def write(jobs: list[ScoreJob], captures: list) -> None:
        writer.put(list(zip(jobs, captures, strict=True)))

    holder: dict[str, list] = {}
    seconds = timed(device, lambda: (run_capture(teacher, batches, "rec", write), holder.setdefault("c", writer.close())))
    commits = holder["c"]
    stored_bytes = sum(c.bytes for c in commits)
    result["store_tok_s"] = round(total_tokens / seconds)
    result["store_over_bare"] = round(result["store_tok_s"] / result["bare_tok_s"], 3)
    result["capture_over_bare"] = round(result["capture_tok_s"] / result["bare_tok_s"], 3)
    result["store_bytes_per_token"] = round(stored_bytes / total_tokens, 1)
    result["store_MB_per_s"] = round(stored_bytes / seconds / 1e6, 1)
    result["shards"] = len(commits)
    if args.store is None:
        shutil.rmtree(store_dir, ignore_errors=True)

    if args.naive:
        with torch.inference_mode():
            naive_capture(model, device_batches[0], args.top_k, layers)
            seconds = timed(device, lambda: [naive_capture(model, b, args.top_k, layers)
                                             for b in device_batches[len(warm):]])
        result["naive_tok_s"] = round(total_tokens / seconds)

    result.update(check_against_reference(model, teacher, batches[0], args.top_k))
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "capture.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
