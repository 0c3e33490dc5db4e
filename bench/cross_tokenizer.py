"""A student with another tokenizer than its teacher's, distilled from a store (`--cross-tokenizer`),
against the same student trained on the teacher's answers alone and against a student that shares the
teacher's tokenizer; and the cost of a cross-tokenizer training step against a same-tokenizer one.

1. The teacher: the demo's 4-layer Llama (width 128, a byte-level BPE of 300 tokens with one token per
   digit) answers `--problems` additions into a store (rationale mode, greedy, top-16 + log tail), as
   bench/student_init.py does.
2. The student tokenizer: a byte-level BPE of `--student-vocab` tokens trained here on other additions,
   *without* the digit split (numbers become multi-digit tokens the teacher never names).
3. Three random-init students of one shape (2 layers, width 128; each with its tokenizer's vocabulary),
   the same `potstill train` schedule (`--steps`, batch 16, lr cosine):
   - cross-tokenizer KD: `--cross-tokenizer`, α = `--alpha` CE on its own tokens of the teacher's text;
   - answers only: the same student, `--cross-tokenizer --alpha 1` (cross-entropy on the teacher's
     text in its own tokens: sequence-level distillation, no teacher distribution);
   - same tokenizer: the teacher's tokenizer, plain KD at the same α.
4. Held-out: nats per byte of the teacher's completion text (comparable across tokenizers), and task
   accuracy on `--eval-problems` unseen problems (greedy, parsed).
5. Step cost: one student step (forward, loss, backward, AdamW) on batches from a DataLoader with
   `--workers` workers, same-tokenizer KD (`StoreDataset`) against cross-tokenizer KD
   (`CrossTokenizerDataset`: alignment in the workers), timed in turn round after round
   (bench/train_step.py `interleaved`); and the loaders alone.

    python bench/cross_tokenizer.py                     # ~20 min on 2 busy CPU cores (and --seed 1)
    python bench/cross_tokenizer.py --steps 0           # the step cost only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import torch
from common import bench_setup
from student_init import make_store, potstill
from train_step import BenchConfig, interleaved, loader, optimizer, to_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def student_tokenizer(path: str, vocab: int, seed: int = 5) -> str:
    """The demo's byte-level BPE trained on other additions, numbers not split into digits."""
    from potstill.cli.demo.teacher import build_tokenizer

    build_tokenizer(seed, vocab, split_digits=False).save_pretrained(path)
    return path


def random_student(path: str, tokenizer_dir: str, seed: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.cli.demo.teacher import model_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(model_config(len(tok), hidden=128, layers=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def nats_per_byte(model_dir: str, store_url: str, eval_fraction: float, records: int) -> float:
    """Cross-entropy of the student's own tokens of each held-out record's completion text, per byte of
    that text (the student's tokens from `cross_tokenizer.align`, identical to the store's for a student
    with the teacher's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.store import open_store
    from potstill.student_train.cross_tokenizer import TokenTable, align
    from potstill.student_train.data import held_out_rows, record_sequence

    store = open_store(store_url)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    s, t = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(store.tokenizer_dir)
    st, tt = TokenTable.of(s), TokenTable.of(t)
    nats = 0.0
    nbytes = 0
    for name, row in held_out_rows(store, eval_fraction)[:records]:
        seq = record_sequence(store.shard(name), row, "topk")
        al = align(t, tt, s, st, seq.ids, seq.score_start)
        ids = torch.tensor(al.ids)[None]
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        i = torch.arange(al.score_start, len(al.ids))
        nats -= logp[i - 1, ids[0, i]].sum().item()
        nbytes += int(al.ends[-1] - al.starts[al.score_start])
    return nats / nbytes


def accuracy(model_dir: str, pairs: list[tuple[int, int]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.cli.demo.teacher import solve_accuracy

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return solve_accuracy(model, AutoTokenizer.from_pretrained(model_dir), pairs, cot=True)


def quality(args: argparse.Namespace, store: str, tok_dir: str, teacher_tok: str,
            eval_pairs: list[tuple[int, int]]) -> dict[str, Any]:
    runs = {
        "cross-tokenizer KD": (tok_dir, ["--cross-tokenizer", "--alpha", str(args.alpha)]),
        "answers only (own tokenizer)": (tok_dir, ["--cross-tokenizer", "--alpha", "1"]),
        "same-tokenizer KD": (teacher_tok, ["--alpha", str(args.alpha)]),
    }
    results: dict[str, Any] = {}
    for name, (tokenizer, flags) in runs.items():
        slug = "".join(c if c.isalnum() else "-" for c in name)
        init = random_student(os.path.join(args.workdir, "init-" + slug), tokenizer, args.seed)
        out = os.path.join(args.workdir, "trained-" + slug)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        potstill("train", "--store", store, "--student", init, "--out", out, "--max-steps", str(args.steps),
                 "--batch-size", "16", "--lr", str(args.lr), "--lr-scheduler", "cosine",
                 "--warmup-steps", str(args.steps // 10), "--seed", str(args.seed), "--num-workers", "1",
                 "--save-steps", str(args.steps), "--report-to", "none", "--eval-fraction", "0.1",
                 "--eval-max-records", "16", "--eval-max-new-tokens", "1", "--threads", "1", *flags)
        seconds = time.time() - t0
        results[name] = {"nats_per_byte": nats_per_byte(out, store, 0.1, args.eval_records),
                         "accuracy": accuracy(out, eval_pairs), "train_seconds": round(seconds, 1)}
        with open(os.path.join(out, "training_report.json")) as f:
            curve = json.load(f)["loss_curve"]
        if curve and "cross_matched" in curve[-1]:
            results[name]["matched_share"] = curve[-1]["cross_matched"]
        print(f"{name}: {results[name]}", file=sys.stderr)
    return results


def step_cost(args: argparse.Namespace, store_url: str, tok_dir: str, teacher_tok: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.store import open_store
    from potstill.student_train.cross_tokenizer import (
        CrossTokenizer,
        CrossTokenizerDataset,
        student_fingerprint,
    )
    from potstill.student_train.data import StoreDataset, plan_split
    from potstill.student_train.model import DistillModel
    from potstill.student_train.objective import Objective, distill_loss

    cfg = BenchConfig(device="cpu", batch=args.batch, steps=args.time_steps, warmup=3, rounds=args.rounds,
                      workers=args.workers, threads=1, seed=args.seed)
    store = open_store(store_url, verify_reads=True)
    plan = plan_split(store, 0.0, 1, cfg.workers)
    student_tok = AutoTokenizer.from_pretrained(tok_dir)
    settings: dict[str, Any] = dict(batch_size=cfg.batch, seed=cfg.seed, pad_id=0)
    same = StoreDataset(store, plan, student_vocab=len(AutoTokenizer.from_pretrained(teacher_tok)), **settings)
    cross = CrossTokenizerDataset(open_store(store_url, verify_reads=True), plan, CrossTokenizer(store, tok_dir),
                                  student_fingerprint(student_tok), student_vocab=len(student_tok), **settings)
    contenders = {}
    tokens = {}
    for name, ds, tokenizer, targets in (("same tokenizer", same, teacher_tok, "topk"),
                                         ("cross tokenizer", cross, tok_dir, "cross")):
        init = random_student(os.path.join(args.workdir, "step-" + targets), tokenizer, args.seed)
        model = DistillModel(AutoModelForCausalLM.from_pretrained(init).train())
        opt = optimizer(model, cfg)
        objective = Objective(targets=targets, alpha=args.alpha)

        def step(batch: dict[str, Any], model: Any = model, opt: Any = opt, objective: Objective = objective) -> None:
            loss, _ = distill_loss(model, to_device(batch, "cpu"), objective)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        contenders[name] = (step, loader(ds, cfg))
        stream = ds.batches(0)  # the mean tokens per batch, over the batches of the first worker's stream
        tokens[name] = sum(int(next(stream)["attention_mask"].sum()) for _ in range(10)) / 10
    steps = interleaved(cfg, contenders, 1)

    def loader_rate(ds: StoreDataset) -> float:
        it = loader(ds, cfg)
        next(it)
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            next(it)
        return args.loader_batches / (time.perf_counter() - start)

    loaders = {"same tokenizer": loader_rate(same), "cross tokenizer": loader_rate(cross)}
    return {"steps_ms": {n: s["step_ms"] for n, s in steps.items()}, "loader_batches_per_s": loaders,
            "tokens_per_batch": tokens,
            "step_ratio": steps["cross tokenizer"]["step_ms"] / steps["same tokenizer"]["step_ms"],
            "per_token_ratio": (steps["cross tokenizer"]["step_ms"] / tokens["cross tokenizer"])
            / (steps["same tokenizer"]["step_ms"] / tokens["same tokenizer"]),
            "loader_ratio": loaders["same tokenizer"] / loaders["cross tokenizer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/potstill-bench-cross-tokenizer")
    parser.add_argument("--problems", type=int, default=600, help="training problems in the store")
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--eval-records", type=int, default=32, help="held-out records for nats per byte")
    parser.add_argument("--student-vocab", type=int, default=320)
    parser.add_argument("--steps", type=int, default=300, help="training steps per student (0: step cost only)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="step cost: records per batch")
    parser.add_argument("--workers", type=int, default=2, help="step cost: loader workers")
    parser.add_argument("--time-steps", type=int, default=10, help="step cost: timed steps per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from potstill.cli.demo import arithmetic
    from potstill.cli.demo.run import CHECKPOINT

    bench_setup(args)
    store = make_store(args.workdir, CHECKPOINT, args.problems)
    tok_dir = student_tokenizer(os.path.join(args.workdir, "student-tokenizer"), args.student_vocab)
    report: dict[str, Any] = {"settings": vars(args), "load_average": os.getloadavg()}
    if args.steps:
        eval_pairs = arithmetic.problems(2, args.eval_problems, exclude=set(arithmetic.problems(1, args.problems)))
        report["quality"] = quality(args, store, tok_dir, CHECKPOINT, eval_pairs)
        report["teacher_accuracy"] = accuracy(CHECKPOINT, eval_pairs)
    report["step"] = step_cost(args, store, tok_dir, CHECKPOINT)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if "quality" in report:
        print(f"teacher accuracy {report['teacher_accuracy']:.1%}")
        print("| student | held-out nats/byte | task accuracy | exact-target share | train s |\n|---|---:|---:|---:|---:|")
        for name, r in report["quality"].items():
            share = "–" if "answers" in name else f"{r['matched_share']:.2f}" if "matched_share" in r else "1 (all)"
            print(f"| {name} | {r['nats_per_byte']:.4f} | {r['accuracy']:.1%} | {share} | {r['train_seconds']:.0f} |")
    s = report["step"]
    print(f"batch {args.batch}, {args.workers} loader workers, 1 torch thread, load {report['load_average'][0]:.1f}")
    print("| | step ms (median round) | loader batches/s | tokens per batch (mean) |\n|---|---:|---:|---:|")
    for name in s["steps_ms"]:
        print(f"| {name} | {s['steps_ms'][name]:.1f} | {s['loader_batches_per_s'][name]:.1f} | {s['tokens_per_batch'][name]:.0f} |")
    print(f"cross / same tokenizer: step {s['step_ratio']:.3f}x, per token {s['per_token_ratio']:.3f}x, "
          f"loader time {s['loader_ratio']:.2f}x")
    assert math.isfinite(s["step_ratio"])


if __name__ == "__main__":
    main()
