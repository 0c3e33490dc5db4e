"""The cost of a training step with two teachers against one, measured side by side.

Two stores over the same token sequences (the second's top-K ids shifted, so that the teachers name
different ids and the union is about 2K wide); the same student step (`objective.distill_loss`,
sparse top-K + tail forward KL, backward, AdamW) on batches streamed through a DataLoader with
worker processes from one store (`StoreDataset`) and from both (`teachers.MixedDataset`), timed in
turn, round after round (bench/train_step.py `interleaved`); and the loaders alone.

    python bench/teachers_step.py --preset cpu --threads 1
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from train_step import (
    BenchConfig,
    interleaved,
    llama,
    loader,
    optimizer,
    parse_args,
    to_device,
    write_store,
)

from potstill.store import create_store, open_store
from potstill.student_train.data import StoreDataset, plan_split
from potstill.student_train.model import DistillModel
from potstill.student_train.objective import Objective, distill_loss
from potstill.student_train.teachers import MixedDataset, Teachers


def second_teacher(src: str, dst: str, vocab: int) -> None:
    """A copy of store `src` whose top-K ids are shifted by K (another teacher over the same tokens)."""
    store = open_store(src)
    other = create_store(dst, store.manifest, {"tokenizer.json": b"{}"})
    k = store.manifest.targets.k
    with other.writer("bench", shard_records=8) as writer:
        for i in range(store.num_records):
            record = store.record(i)
            record.topk_ids = ((record.topk_ids.astype(np.int64) + k) % vocab).astype(np.int32)
            writer.write(record)


def datasets(urls: list[str], cfg: BenchConfig) -> tuple[StoreDataset, MixedDataset]:
    settings: dict[str, Any] = dict(batch_size=cfg.batch, seed=cfg.seed, student_vocab=cfg.vocab)
    one = StoreDataset.open(urls[0], eval_fraction=0.0, num_workers=cfg.workers, **settings)
    primary = open_store(urls[0], verify_reads=True)
    plan = plan_split(primary, 0.0, 1, cfg.workers)
    teachers, plan = Teachers.open(primary, plan, [open_store(urls[1], verify_reads=True)], [0.5])
    return one, MixedDataset(primary, plan, teachers, **settings)


def loader_rate(ds: StoreDataset, cfg: BenchConfig, batches: int) -> float:
    it = loader(ds, cfg)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = cfg.store_dir or tempfile.mkdtemp(prefix="potstill-bench-teachers-")
    try:
        urls = [os.path.join(root, "a.store"), os.path.join(root, "b.store")]
        if not os.path.exists(urls[0]):
            write_store(urls[0], cfg, records=cfg.batch * (cfg.warmup + cfg.rounds * cfg.steps + 2 * cfg.workers + 4) * 2,
                        hidden_layers=0, hidden_width=cfg.teacher_hidden)
        if not os.path.exists(urls[1]):
            second_teacher(urls[0], urls[1], cfg.vocab)
        student = llama(cfg, cfg.student_hidden, cfg.student_layers).train()
        model = DistillModel(student)
        opt = optimizer(model, cfg)
        objective = Objective()

        def kd_step(batch: dict[str, Any]) -> None:
            loss, _ = distill_loss(model, to_device(batch, cfg.device), objective)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        one, two = datasets(urls, cfg)
        steps = interleaved(cfg, {"one teacher": (kd_step, loader(one, cfg)), "two teachers": (kd_step, loader(two, cfg))},
                            cfg.batch * cfg.seq)
        width = int(next(two.batches(0))["topk_ids"].shape[1])
        loaders = {name: loader_rate(ds, cfg, cfg.loader_batches) for name, ds in (("one teacher", one), ("two teachers", two))}
    finally:
        if not cfg.store_dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {"config": dataclasses.asdict(cfg), "steps": steps, "loader_batches_per_s": loaders, "mixed_width": width,
              "step_ratio": steps["two teachers"]["step_ms"] / steps["one teacher"]["step_ms"],
              "loader_ratio": loaders["one teacher"] / loaders["two teachers"], "load_average": os.getloadavg()}
    print(f"batch {cfg.batch} × {cfg.seq} tokens, vocab {cfg.vocab}, K {cfg.k} per teacher (mixed width {width}), "
          f"{cfg.workers} loader workers, {torch.get_num_threads()} torch threads, load {report['load_average'][0]:.1f}")
    print("| | step ms (median round) | loader batches/s |\n|---|---|---|")
    for name in steps:
        print(f"| {name} | {steps[name]['step_ms']:.1f} | {loaders[name]:.1f} |")
    print(f"two / one teacher: step {report['step_ratio']:.3f}x, loader time {report['loader_ratio']:.2f}x")
    return report


if __name__ == "__main__":
    main()
