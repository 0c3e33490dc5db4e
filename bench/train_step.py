"""Student training-step throughput: from a store on disk vs the same step with the targets already
in memory, vs online KD with the teacher in the loop; and the loader alone.

Modes (tokens/s = input tokens per second of one process):

- `memory`: the real potstill step (`objective.distill_loss` on `model.DistillModel`, sparse top-K +
  tail forward KL, backward, AdamW) on batches collated from the store once and kept on the device;
- `store`: the same step, each batch streamed from the store by `data.StoreDataset` through a
  DataLoader with worker processes (pinned, non-blocking copies on CUDA), with the loader's checks
  on (each shard file's sha256, ids and values checked once per run before their first use)
  — target ≥ 95% of `memory`;
- `store-unchecked`: the same without those checks, to show what they cost;
- `online`: the anchor's online KD (the reference script gpu_baseline.py): a teacher forward inside
  the loop, then full-vocabulary KL of the student;
- `loader`: only the DataLoader, no model: the tokens/s it can feed, without and with hidden states,
  with the checks and without them (`(unchecked)`).

Models are random-weight Llamas built from a config; the store is written with random but valid
targets (their values do not change any timing). Sizes are flags; `--preset anchor` is the anchor
(teacher 1.2B, student 0.2B, vocab 128,256, 8 × 1024 tokens, top-64, bf16), `--preset cpu` a size a
2-core CPU runs in a minute or two.

    python bench/train_step.py --preset cpu                       # CPU: every mode
    python bench/train_step.py --preset anchor --device cuda      # GPU: the anchor sizes
    python bench/train_step.py --preset cpu --modes loader --loader-hidden-width 2048 --seq 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.student_train.data import StoreDataset
from potstill.student_train.model import DistillModel
from potstill.student_train.objective import Objective, distill_loss


@dataclass
class BenchConfig:
    preset: str = "cpu"  # cpu | anchor: sets the sizes below unless a flag gives them
    device: str = "auto"  # auto | cpu | cuda
    modes: str = "memory,store,store-unchecked,online,loader"
    vocab: int = 0
    k: int = 64
    batch: int = 0  # records (sequences) per step
    seq: int = 0  # tokens per record
    teacher_hidden: int = 0
    teacher_layers: int = 0
    student_hidden: int = 0
    student_layers: int = 0
    dtype: str = ""  # model dtype: bfloat16 on CUDA (as the anchor), float32 on CPU
    steps: int = 0  # timed steps per mode and round
    warmup: int = 0
    rounds: int = 3  # modes are timed in turn, round after round; the median round counts
    workers: int = 2  # DataLoader workers of the store and loader modes
    threads: int = 0  # torch CPU threads of the training process (0: torch's default)
    loader_batches: int = 0  # batches timed in the loader mode
    loader_hidden_layers: int = 3  # stored hidden layers read in the loader mode "with hidden states"
    loader_hidden_width: int = 0  # their width (the teacher's hidden size by default)
    store_dir: str = ""  # where to write the stores (default: a temporary folder, removed)
    seed: int = 0
    json: str = ""


PRESETS: dict[str, dict[str, Any]] = {
    "anchor": dict(vocab=128256, batch=8, seq=1024, teacher_hidden=2048, teacher_layers=16, student_hidden=768,
                   student_layers=12, steps=10, warmup=3, loader_batches=40),
    "cpu": dict(vocab=8192, batch=4, seq=256, teacher_hidden=256, teacher_layers=4, student_hidden=128,
                student_layers=2, steps=8, warmup=2, loader_batches=40),
}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(BenchConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = BenchConfig(**vars(p.parse_args(argv)))
    if cfg.preset not in PRESETS:
        p.error(f"--preset must be one of {', '.join(PRESETS)}")
    for name, value in PRESETS[cfg.preset].items():
        if not getattr(cfg, name):
            setattr(cfg, name, value)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.device == "cuda" else "float32")
    cfg.loader_hidden_width = cfg.loader_hidden_width or cfg.teacher_hidden
    return cfg


# -- a store of random but valid records ------------------------------------------------------------
def write_store(url: str, cfg: BenchConfig, records: int, hidden_layers: int, hidden_width: int) -> None:
    """`records` sequences of `seq` tokens, every position after the first scored (score_start 1)."""
    rng = np.random.default_rng(cfg.seed)
    layers = [HiddenLayer(i + 1, hidden_width, "bfloat16") for i in range(hidden_layers)]
    manifest = StoreManifest(
        teacher=TeacherInfo(name_or_path="bench-random-teacher", dtype="bfloat16", vocab_size=cfg.vocab),
        tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=cfg.vocab),
        targets=TargetSpec(k=cfg.k, logprob_dtype="float16"),
        hidden=HiddenSpec(layers=layers, chunk_tokens=1024),
        generation={"mode": "bench"},
    )
    store = create_store(url, manifest, {"tokenizer.json": b"{}"})
    m = cfg.seq - 1
    pool = (rng.standard_normal((2 * cfg.seq, hidden_width), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    # Small shards: the loader meets a new shard every couple of batches, so that hashing each one
    # before its first use falls inside the timed steps instead of the warm-up.
    with store.writer("bench", shard_records=8) as writer:
        for i in range(records):
            mass = rng.exponential(size=(m, cfg.k + 1))
            mass /= mass.sum(axis=1, keepdims=True)
            top_lp = np.log(-np.sort(-mass[:, : cfg.k], axis=1)).astype(np.float32)
            top_ids = ((rng.integers(0, cfg.vocab, size=(m, 1)) + np.arange(cfg.k)) % cfg.vocab).astype(np.int32)
            ids = rng.integers(0, cfg.vocab, size=cfg.seq).astype(np.int32)
            h0 = int(rng.integers(0, cfg.seq))
            writer.write(Record(
                id=f"r{i:06d}", input_ids=ids, score_start=1, topk_ids=top_ids, topk_logprobs=top_lp.astype(np.float16),
                token_logprob=top_lp[:, 0], tail_logprob=np.log(mass[:, cfg.k]).astype(np.float32),
                hidden={layer.index: pool[h0 : h0 + cfg.seq] for layer in layers},
            ))


# -- models -----------------------------------------------------------------------------------------
def llama(cfg: BenchConfig, hidden: int, layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=max(4096, cfg.seq),
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(cfg.device, getattr(torch, cfg.dtype))


def optimizer(model: torch.nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cfg.device == "cuda")


def sync(cfg: BenchConfig) -> None:
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def timed(cfg: BenchConfig, step: Any, batches: Any, tokens_per_step: int) -> dict[str, float]:
    """`steps` steps after the warm-up: tokens/s over their wall time, and peak memory on CUDA."""
    sync(cfg)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step(next(batches))
    sync(cfg)
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": cfg.steps * tokens_per_step / seconds, "step_ms": 1000 * seconds / cfg.steps}
    if cfg.device == "cuda":
        result["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def interleaved(cfg: BenchConfig, contenders: dict[str, tuple[Any, Any]], tokens_per_step: int) -> dict[str, dict[str, float]]:
    """Warm every contender up, then time them in turn for `rounds` rounds and keep each one's median
    round: a shared, noisy machine then slows all of them alike."""
    for step, batches in contenders.values():
        for _ in range(cfg.warmup):
            step(next(batches))
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for _ in range(cfg.rounds):
        for name, (step, batches) in contenders.items():
            rounds[name].append(timed(cfg, step, batches, tokens_per_step))
    return {name: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for name, rs in rounds.items()}


def dataset(url: str, cfg: BenchConfig, hidden_layers: tuple[int, ...] = (), verify_reads: bool = True) -> StoreDataset:
    return StoreDataset.open(url, batch_size=cfg.batch, eval_fraction=0.0, num_workers=cfg.workers, seed=cfg.seed,
                             hidden_layers=hidden_layers, student_vocab=cfg.vocab, verify_reads=verify_reads)


def loader(ds: StoreDataset, cfg: BenchConfig) -> Any:
    from torch.utils.data import DataLoader

    return iter(DataLoader(ds, batch_size=None, num_workers=cfg.workers, pin_memory=cfg.device == "cuda"))


# -- modes ------------------------------------------------------------------------------------------
def bench_kd_steps(url: str, cfg: BenchConfig, modes: list[str]) -> dict[str, dict[str, float]]:
    student = llama(cfg, cfg.student_hidden, cfg.student_layers).train()
    model = DistillModel(student)
    opt = optimizer(model, cfg)
    objective = Objective()  # sparse top-K + tail forward KL, T = 1
    tokens = cfg.batch * cfg.seq
    results = {}

    def kd_step(batch: dict[str, Any]) -> None:
        loss, _ = distill_loss(model, to_device(batch, cfg.device), objective)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    contenders = {}
    if "memory" in modes:
        source = dataset(url, cfg).batches(0)
        cached = [to_device(next(source), cfg.device) for _ in range(4)]  # on the device before timing
        contenders["memory"] = (kd_step, itertools.cycle(cached))
    if "store" in modes:
        contenders["store"] = (kd_step, loader(dataset(url, cfg), cfg))
    if "store-unchecked" in modes:
        contenders["store-unchecked"] = (kd_step, loader(dataset(url, cfg, verify_reads=False), cfg))
    if "online" in modes:
        teacher = llama(cfg, cfg.teacher_hidden, cfg.teacher_layers).eval()
        ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=cfg.device)

        def online_step(_: Any) -> None:  # the anchor's s_online
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            s_logits = student(input_ids=ids).logits
            loss = torch.nn.functional.kl_div(torch.log_softmax(s_logits.float(), -1), torch.log_softmax(t_logits.float(), -1),
                                              log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        contenders["online"] = (online_step, itertools.repeat(None))
    results.update(interleaved(cfg, contenders, tokens))
    return results


def bench_loader(url: str, cfg: BenchConfig, hidden_layers: tuple[int, ...], batches: int,
                 verify_reads: bool = True) -> dict[str, float]:
    it = loader(dataset(url, cfg, hidden_layers, verify_reads), cfg)
    next(it)  # workers started
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += int(next(it)["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "batch_ms": 1000 * seconds / batches}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    if cfg.threads:  # on a shared CPU, OpenMP threads that wait on each other can slow steps 10x or more
        torch.set_num_threads(cfg.threads)
    modes = [m.strip() for m in cfg.modes.split(",") if m.strip()]
    root = cfg.store_dir or tempfile.mkdtemp(prefix="potstill-bench-train-")
    results: dict[str, Any] = {}
    try:
        if {"memory", "store", "online"} & set(modes):
            url = os.path.join(root, "targets.store")
            if not os.path.exists(url):
                write_store(url, cfg, records=cfg.batch * (cfg.warmup + cfg.rounds * cfg.steps + 2 * cfg.workers + 4),
                            hidden_layers=0, hidden_width=cfg.teacher_hidden)
            results.update(bench_kd_steps(url, cfg, modes))
        if "loader" in modes:
            # One epoch's worth of records (no batch read twice), so that with the checks on every byte
            # the loader hands over was hashed first, in fresh worker processes for each measurement.
            # (With hidden states a quarter as many batches: 12 KB a token makes a big store.)
            targets_url, hidden_url = os.path.join(root, "loader.store"), os.path.join(root, "hidden.store")
            hidden_batches = max(1, cfg.loader_batches // 4)
            if not os.path.exists(targets_url):
                write_store(targets_url, cfg, records=cfg.batch * (cfg.loader_batches + 2 * cfg.workers + 1),
                            hidden_layers=0, hidden_width=cfg.loader_hidden_width)
            if not os.path.exists(hidden_url):
                write_store(hidden_url, cfg, records=cfg.batch * (hidden_batches + 2 * cfg.workers + 1),
                            hidden_layers=cfg.loader_hidden_layers, hidden_width=cfg.loader_hidden_width)
            layers = tuple(range(1, cfg.loader_hidden_layers + 1))
            for checked in (True, False):
                suffix = "" if checked else " (unchecked)"
                results["loader" + suffix] = bench_loader(targets_url, cfg, (), cfg.loader_batches, checked)
                results[f"loader+{len(layers)} hidden{suffix}"] = bench_loader(hidden_url, cfg, layers, hidden_batches,
                                                                                checked)
    finally:
        if not cfg.store_dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "config": dataclasses.asdict(cfg),
        "results": results,
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    if "memory" in results and "store" in results:
        report["store_vs_memory"] = results["store"]["tokens_per_s"] / results["memory"]["tokens_per_s"]
    if "store-unchecked" in results and "store" in results:
        report["checked_vs_unchecked"] = results["store"]["tokens_per_s"] / results["store-unchecked"]["tokens_per_s"]
    print_table(report)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_table(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(f"device {report['device']} ({report['cpus']} CPUs, {report['threads']} torch threads, load "
          f"{report['load_average'][0]:.1f}), {cfg['dtype']}, batch {cfg['batch']} × {cfg['seq']} tokens, "
          f"vocab {cfg['vocab']}, K {cfg['k']}, loader workers {cfg['workers']}")
    print("| mode | tokens/s | ms | peak GiB |\n|---|---|---|---|")
    for mode, r in report["results"].items():
        ms = r.get("step_ms", r.get("batch_ms", 0.0))
        peak = f"{r['peak_GiB']:.1f}" if "peak_GiB" in r else "-"
        print(f"| {mode} | {r['tokens_per_s']:,.0f} | {ms:.1f} | {peak} |")
    if "store_vs_memory" in report:
        print(f"store / memory: {100 * report['store_vs_memory']:.1f}%")
    if "checked_vs_unchecked" in report:
        print(f"store with checks / without: {100 * report['checked_vs_unchecked']:.1f}%")


if __name__ == "__main__":
    main()
