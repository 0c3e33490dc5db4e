"""A student made from its teacher (`potstill student init`) against the same architecture at random,
both trained from one store for the same steps. Two teachers (`--teacher`):

`--teacher demo` (the default):

1. The teacher: the demo's 4-layer Llama (width 128) that solves 4-digit additions by writing out the
   carries (`potstill demo`'s checkpoint). It answers `--problems` training problems into a store
   (rationale mode, greedy, top-16 log-probs + log tail), as `potstill demo` does.
2. Two students of one architecture (the teacher's, `--layers` layers: ≈0.6M parameters at 2):
   `potstill student init --teacher T --layers N` (the embeddings, the head, the final norm and layers
   spread evenly copied from the teacher), and the same config initialised at random (seeded).
3. The same `potstill train` run for each (`--steps`, batch 32, `--lr` cosine with 10% warm-up,
   forward KL on the stored top-K + tail, `--alpha` CE on the teacher's tokens, 1 thread).
4. Held-out KD loss and top-1 agreement (`potstill train`'s final eval over the store's held-out
   records, eval fraction 0.1) and the task's accuracy: greedy answers to `--eval-problems` problems
   none of the models saw, parsed and compared with the true sum. The student made from the teacher is
   also scored before any training.

    python bench/student_init.py               # ~8 min on 2 busy CPU cores (the store, ~1 min, is made once)
    python bench/student_init.py --steps 50    # a quick look

`--teacher smollm2`: SmolLM2-135M-Instruct (30 layers, width 576; the test suite's real teacher, from
its GGUF file) scores `--records` passages of English prose (the module docstrings of Python's
standard library: a prompt of about 80 characters, its next ≤ 320 as the completion) into a store
with the default targets (64 systematic draws, compact codec). The students keep `--layers` of its
layers (4: 42.5M parameters, most of them the tied embedding); the same `potstill train` run each
(batch 8, forward KL on the draws, no CE). Held-out KD loss and top-1 agreement as above; the prose
has no task with checkable answers, so no task accuracy.

    python bench/student_init.py --teacher smollm2     # ~25 min on 2 busy CPU cores (each student ~10)

Results: a markdown table on stdout and `--json FILE`. The store stays in `--workdir` between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any


def potstill(*args: str) -> None:
    """`potstill ARGS` in this process: torch and transformers are imported once for the whole bench
    (a fresh process per command paid ~5 s of imports each). What it prints goes to stderr, so that
    stdout holds the results table alone."""
    from potstill.cli.main import app
    from potstill.store.errors import PotstillError

    try:
        with contextlib.redirect_stdout(sys.stderr):
            code = app(list(args), prog_name="potstill", standalone_mode=False)  # (typer.Exit: its code)
    except PotstillError as e:
        raise SystemExit(f"potstill {' '.join(args)} failed: {e}") from None
    if isinstance(code, int) and code != 0:
        raise SystemExit(f"potstill {' '.join(args)} failed with exit {code}")


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_store(workdir: str, teacher: str, problems: int) -> str:
    from potstill.cli.demo import arithmetic

    store = os.path.join(workdir, f"store-{problems}")
    if os.path.isdir(store):
        return store
    prompts = os.path.join(workdir, "train_prompts.jsonl")
    pairs = arithmetic.problems(1, problems)
    write_jsonl(prompts, [{"id": f"p{i:05d}", "prompt": arithmetic.question(a, b)} for i, (a, b) in enumerate(pairs)])
    potstill("generate", "--teacher", teacher, "--prompts", prompts, "--out", store, "--mode", "generate",
             "--rationale", "--rationale-template", "{prompt}" + arithmetic.COT_TRIGGER,
             "--sampling-temperature", "0", "--max-new-tokens", "96", "--targets", "topk", "--top-k", "16",
             "--shard-records", "512", "--device", "cpu", "--threads", "1", "--no-progress")
    return store


def prose_rows(records: int) -> list[dict[str, Any]]:
    """Passages of English: the module docstrings of the standard library, a prompt and its continuation."""
    import ast
    import sysconfig

    from fidelity_common import corpus_files

    rows: list[dict[str, Any]] = []
    for path in corpus_files(sysconfig.get_paths()["stdlib"]):
        try:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        text = " ".join((doc or "").split())
        if len(text) < 240:
            continue
        cut = text.rfind(" ", 0, 80)
        rows.append({"id": os.path.relpath(path, sysconfig.get_paths()["stdlib"]),
                     "prompt": text[:cut], "completion": text[cut:cut + 320]})
        if len(rows) == records:
            break
    return rows


def make_prose_store(workdir: str, teacher: str, records: int) -> str:
    store = os.path.join(workdir, f"store-prose-{records}")
    if os.path.isdir(store):
        return store
    prompts = os.path.join(workdir, "prose.jsonl")
    write_jsonl(prompts, prose_rows(records))
    potstill("generate", "--teacher", teacher, "--prompts", prompts, "--out", store,
             "--device", "cpu", "--threads", "1", "--no-progress")
    return store


def random_twin(init_dir: str, out: str, seed: int) -> None:
    """The architecture of `init_dir` with the family's own random init, and the same tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(out)


def accuracy(model_dir: str, pairs: list[tuple[int, int]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.cli.demo.teacher import solve_accuracy

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return solve_accuracy(model, AutoTokenizer.from_pretrained(model_dir), pairs, cot=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", choices=("demo", "smollm2"), default="demo")
    parser.add_argument("--workdir", default="/tmp/potstill-bench-student-init")
    parser.add_argument("--records", type=int, default=180, help="smollm2: prose passages in the store")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (demo), 8 (smollm2)")
    parser.add_argument("--problems", type=int, default=600, help="training problems in the store")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None, help="default: 200 (demo), 60 (smollm2)")
    parser.add_argument("--layers", default=None, help="potstill student init --layers; default: 2 (demo), 4 (smollm2)")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 (demo), 1e-3 (smollm2)")
    parser.add_argument("--alpha", type=float, default=None, help="default: 0.2 (demo), 0 (smollm2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    demo = args.teacher == "demo"
    for name, for_demo, for_smollm2 in (("steps", 200, 60), ("layers", "2", "4"), ("lr", 3e-3, 1e-3),
                                        ("alpha", 0.2, 0.0), ("batch_size", 32, 8)):
        if getattr(args, name) is None:
            setattr(args, name, for_demo if demo else for_smollm2)

    from common import bench_setup

    from potstill.cli.demo import arithmetic
    from potstill.cli.demo.run import CHECKPOINT

    bench_setup(args)
    started = time.time()
    if demo:
        teacher = CHECKPOINT
        store = make_store(args.workdir, teacher, args.problems)
        eval_pairs = arithmetic.problems(2, args.eval_problems, exclude=set(arithmetic.problems(1, args.problems)))
    else:
        from common import fetch_real_teacher

        teacher = fetch_real_teacher().folder
        store = make_prose_store(args.workdir, teacher, args.records)
        eval_pairs = []
    print(f"store: {store} ({time.time() - started:.0f} s)", file=sys.stderr)

    def task_accuracy(model_dir: str) -> float | None:
        return accuracy(model_dir, eval_pairs) if demo else None  # prose: no task with answers

    inits = {"from teacher": os.path.join(args.workdir, "init-teacher"), "random": os.path.join(args.workdir, "init-random")}
    for path in inits.values():
        shutil.rmtree(path, ignore_errors=True)
    potstill("student", "init", "--teacher", teacher, "--layers", args.layers, "--out", inits["from teacher"],
             "--seed", str(args.seed))
    random_twin(inits["from teacher"], inits["random"], args.seed)

    results: dict[str, Any] = {"teacher": {"accuracy": task_accuracy(teacher)},
                               "from teacher, untrained": {"accuracy": task_accuracy(inits["from teacher"])}}
    for name, init in inits.items():
        out = os.path.join(args.workdir, "trained-" + name.replace(" ", "-"))
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        potstill("train", "--store", store, "--student", init, "--out", out, "--max-steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-scheduler", "cosine",
                 "--warmup-steps", str(args.steps // 10), "--alpha", str(args.alpha), "--seed", str(args.seed),
                 "--num-workers", "0", "--save-steps", str(args.steps), "--report-to", "none",
                 "--eval-fraction", "0.1", "--eval-max-records", "0", "--eval-max-new-tokens", "1",
                 "--no-bf16", "--threads", "1")
        with open(os.path.join(out, "training_report.json")) as f:
            ev = json.load(f)["final_eval"]
        results[name] = {"kd_loss": ev["kd_loss"], "top1_agreement": ev["top1_agreement"],
                         "held_out_records": ev["records"], "train_seconds": round(time.time() - t0, 1),
                         "accuracy": task_accuracy(out)}
        print(f"{name}: {results[name]}", file=sys.stderr)

    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(os.path.join(inits["random"], "model.safetensors")).values())
    report = {"settings": vars(args), "student_parameters": params, "results": results,
              "seconds": round(time.time() - started, 1)}
    data = (f"{args.problems} stored problems, {args.eval_problems} held-out problems" if demo
            else f"{args.records} stored prose passages")
    print(f"\nstudent: {args.layers} layers of the {args.teacher} teacher, {params:,} parameters; {args.steps} steps, "
          f"batch {args.batch_size}, lr {args.lr}, {data}\n")
    print("| student | held-out KD loss | top-1 agreement | task accuracy |")
    print("|---|---|---|---|")

    def shown(value: float | None) -> str:
        return "— (no task)" if value is None else f"{value:.1%}"

    print(f"| teacher | — | — | {shown(results['teacher']['accuracy'])} |")
    print(f"| from the teacher, before training | — | — | {shown(results['from teacher, untrained']['accuracy'])} |")
    for name in inits:
        r = results[name]
        print(f"| {name}, trained | {r['kd_loss']:.4f} | {r['top1_agreement']:.3f} | {shown(r['accuracy'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
