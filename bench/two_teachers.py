"""Two teachers with different strengths, one student distilled from both stores, against each
single-teacher student and the answers-only baseline, on a held-out mix of both tasks.

1. The teachers: two tiny Llamas (the demo's tokenizer and model family, width `--teacher-hidden`)
   trained from scratch with cross-entropy on worked solutions, one on 3-digit additions only, one
   on 3-digit subtractions only (column arithmetic with the carries / borrows written out). Each
   solves its own task and not the other.
2. One prompt set of `--problems` problems, half of each task, with their worked solutions; each
   teacher scores the same prompt + solution tokens into its own store through `potstill generate
   --mode score` (top-16 log-probs + log tail). An answers-only store ("The answer is N." after each
   prompt, no worked solution) feeds the baseline, as in `potstill demo`.
3. Students from one seeded init (2 layers, width `--student-hidden`), the same steps, batch, lr
   and CE weight `--alpha` on the stored tokens: answers only (CE alone), KD from the addition
   store, KD from the subtraction store, KD from both (`--store A --store B`, equal weights).
   `--seeds` repeats the students (init and data order); the table gives medians over seeds.
4. Every model answers `--eval-problems` held-out problems of each task (greedy, parsed, compared
   with the true result); the held-out KD loss of each student against each teacher's targets and
   against their mixture is `potstill eval` over both stores (held-out records of the stores).

    python bench/two_teachers.py             # ~30 min on 2 busy CPU cores, 1 thread (teachers: 2 × 1-9 min)
    python bench/two_teachers.py --seeds 3   # medians over 3 seeds
    python bench/two_teachers.py --alpha 0.5 # half of each KD student's loss CE on the stored (true) tokens

Results: a markdown table on stdout and `--json FILE`. Teachers and stores stay in `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("add", "sub")
SIGN = {"add": "+", "sub": "-"}


# -- the two tasks -----------------------------------------------------------------------------------
def question(task: str, a: int, b: int) -> str:
    return f"What is {a} {SIGN[task]} {b}?\n"


def result(task: str, a: int, b: int) -> int:
    return a + b if task == "add" else a - b


def worked_solution(task: str, a: int, b: int) -> str:
    """Column arithmetic from the ones digit up, one line per column; a subtraction's a ≥ b."""
    from potstill.cli.demo import arithmetic

    if task == "add":
        return arithmetic.worked_solution(a, b)
    xs, ys = str(a)[::-1], str(b)[::-1]
    borrow, lines = 0, []
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        d = x - y - borrow
        lines.append(f"{x}-{y}-{borrow}={d}, write {d % 10} borrow {int(d < 0)}.")
        borrow = int(d < 0)
    return "\n".join(lines) + f"\nThe answer is {a - b:03d}."  # every written digit, leading zeros too


def problems(task: str, seed: int, count: int, exclude: set[tuple[str, int, int]] = frozenset()) -> list[tuple[str, int, int]]:
    """`count` distinct 3-digit problems of `task` (a ≥ b for subtractions), none in `exclude`."""
    rng = random.Random(f"{task}-{seed}")
    out: list[tuple[str, int, int]] = []
    seen = set(exclude)
    while len(out) < count:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if task == "sub" and a < b:
            a, b = b, a
        if (task, a, b) not in seen:
            seen.add((task, a, b))
            out.append((task, a, b))
    return out


# -- the teachers ------------------------------------------------------------------------------------
def train_teacher(out: str, task: str, steps: int, hidden: int, layers: int, seed: int = 0) -> None:
    """The demo teacher's recipe (cli/demo/teacher.py) on one task: CE on worked solutions."""
    import torch
    from transformers import LlamaForCausalLM

    from potstill.cli.demo import arithmetic
    from potstill.cli.demo.teacher import build_tokenizer, model_config, train_on_pairs

    torch.manual_seed(seed)
    rng = random.Random(f"teacher-{task}-{seed}")
    tok = build_tokenizer()
    model = LlamaForCausalLM(model_config(len(tok), hidden=hidden, layers=layers))

    def make_batch() -> list[tuple[str, str]]:
        batch = [problems(task, rng.randrange(1 << 30), 1)[0] for _ in range(32)]
        return [(question(*p) + arithmetic.COT_TRIGGER, worked_solution(*p)) for p in batch]

    train_on_pairs(
        model, tok, make_batch, steps,
        log=lambda step, loss: print(f"  teacher {task} step {step}: loss {loss:.4f}", file=sys.stderr, flush=True),
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def accuracy(model_dir: str, items: list[tuple[str, int, int]], cot: bool = True, batch: int = 100) -> float:
    """Greedy answers to `items` (prompted as trained: with the worked-solution cue, or without for the
    answers-only student), parsed and compared with the true results."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.cli.demo import arithmetic

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        rows = [tok(question(*p) + (arithmetic.COT_TRIGGER if cot else "")).input_ids for p in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=120, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for p, row in zip(chunk, out[:, width:], strict=True):
            correct += arithmetic.parse_answer(tok.decode(row, skip_special_tokens=True)) == result(*p)
    return correct / len(items)


# -- stores, students -------------------------------------------------------------------------------
def potstill(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"potstill {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_stores(workdir: str, teachers: dict[str, str], train_items: list[tuple[str, int, int]]) -> dict[str, str]:
    """One score-mode store per teacher over the same prompt + worked-solution tokens, and the answers-only store."""
    from potstill.cli.demo import arithmetic

    rows = [{"id": f"{t}{i:05d}", "prompt": question(t, a, b) + arithmetic.COT_TRIGGER,
             "completion": worked_solution(t, a, b)} for i, (t, a, b) in enumerate(train_items)]
    solutions = write_jsonl(os.path.join(workdir, "solutions.jsonl"), rows)
    answers = write_jsonl(os.path.join(workdir, "answers.jsonl"), [
        {"id": f"{t}{i:05d}", "prompt": question(t, a, b), "completion": worked_solution(t, a, b).splitlines()[-1]}
        for i, (t, a, b) in enumerate(train_items)])
    stores = {}
    for name, (teacher, prompts) in {"add": (teachers["add"], solutions), "sub": (teachers["sub"], solutions),
                                      "answers": (teachers["add"], answers)}.items():
        stores[name] = os.path.join(workdir, f"{name}-{len(train_items)}.store")
        if not os.path.isdir(stores[name]):
            potstill("generate", "--teacher", teacher, "--prompts", prompts, "--out", stores[name], "--mode", "score",
                     "--targets", "topk", "--top-k", "16", "--shard-records", "512", "--device", "cpu",
                     "--threads", "1", "--no-progress")
    return stores


def mixture_figures(add_store: str, sub_store: str) -> dict[str, dict[str, float]]:
    """Per task, over every stored position: how often the equal-weight mixture's (and the task's own
    teacher's) most likely token is the true one, and how often its two most likely tokens lie within
    0.1 of each other (a near tie, which greedy decoding resolves either way)."""
    import numpy as np

    from potstill.store import open_store
    from potstill.store.targets import TopKRows
    from potstill.student_train.teachers import mix_topk

    def rows(rec: Any) -> TopKRows:
        return TopKRows(np.asarray(rec.topk_ids), np.asarray(rec.topk_logprobs, np.float32),
                        np.asarray(rec.token_logprob, np.float32), np.asarray(rec.tail_logprob, np.float32))

    other = {rec.id: rec for rec in open_store(sub_store).iter_records()}
    counts = {task: np.zeros(4) for task in TASKS}  # positions, mixture right, own teacher right, near ties
    for rec in open_store(add_store).iter_records():
        theirs, n = other[rec.id], rec.num_scored
        mixed = mix_topk([(rows(rec), np.full(n, 0.5)), (rows(theirs), np.full(n, 0.5))], 2 * rec.topk_ids.shape[1])
        true = np.asarray(rec.input_ids)[rec.score_start :]
        task = rec.id[:3]
        p = np.exp(mixed.logprobs.astype(np.float64))
        own = rec if task == "add" else theirs
        counts[task] += [n, (mixed.ids[:, 0] == true).sum(), (np.asarray(own.topk_ids)[:, 0] == true).sum(),
                         (p[:, 0] - p[:, 1] < 0.1).sum()]
    return {task: {"positions": int(c[0]), "mixture_top1_true": c[1] / c[0], "own_teacher_top1_true": c[2] / c[0],
                   "mixture_near_tie": c[3] / c[0]} for task, c in counts.items()}


def student_init(out: str, tokenizer_dir: str, hidden: int, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from potstill.cli.demo.teacher import model_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    LlamaForCausalLM(model_config(len(tok), hidden=hidden, layers=2)).save_pretrained(out)
    tok.save_pretrained(out)


def train_student(stores: list[str], init: str, out: str, args: argparse.Namespace, seed: int, alpha: float) -> float:
    from potstill.student_train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    train(TrainConfig(store=stores, student=init, out=out, max_steps=args.steps, batch_size=32, lr=args.lr,
                      lr_scheduler="cosine", warmup_steps=args.steps // 10, alpha=alpha, seed=seed, num_workers=0,
                      save_steps=args.steps, logging_steps=max(1, args.steps // 4), report_to="none",
                      eval_fraction=0.1, eval_max_records=0, eval_max_new_tokens=1, bf16=False).validate())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/potstill-bench-two-teachers")
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--problems", type=int, default=800, help="stored training problems, half of each task")
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out problems of each task")
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.2, help="CE weight on the stored tokens of every KD student")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from common import bench_setup

    bench_setup(args)
    started = time.time()
    teachers = {}
    for task in TASKS:
        teachers[task] = os.path.join(args.workdir, f"teacher-{task}-{args.teacher_hidden}x{args.teacher_layers}-{args.teacher_steps}")
        if not os.path.isdir(teachers[task]):
            train_teacher(teachers[task], task, args.teacher_steps, args.teacher_hidden, args.teacher_layers)
    train_items = [p for task in TASKS for p in problems(task, 1, args.problems // 2)]
    random.Random(0).shuffle(train_items)
    held = {task: problems(task, 2, args.eval_problems, exclude=set(train_items)) for task in TASKS}
    results: dict[str, Any] = {}
    for task in TASKS:
        results[f"teacher {task}"] = {"accuracy": {t: accuracy(teachers[task], held[t]) for t in TASKS}}
        print(f"teacher {task}: {results[f'teacher {task}']}", file=sys.stderr, flush=True)
    stores = make_stores(args.workdir, teachers, train_items)
    print(f"teachers and stores: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    results["mixture"] = mixture_figures(stores["add"], stores["sub"])

    students = {"KD from both (equal weights)": (["add", "sub"], args.alpha),
                "KD from the addition teacher": (["add"], args.alpha),
                "KD from the subtraction teacher": (["sub"], args.alpha), "answers only": (["answers"], 1.0)}
    from potstill.student_train import evaluate

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in students}
    for seed in range(args.seeds):
        init = os.path.join(args.workdir, f"student-init-{seed}")
        shutil.rmtree(init, ignore_errors=True)
        student_init(init, teachers["add"], args.student_hidden, seed)
        for name, (names, alpha) in students.items():
            out = os.path.join(args.workdir, "student-" + "-".join(names) + f"-{seed}")
            seconds = train_student([stores[n] for n in names], init, out, args, seed, alpha)
            run: dict[str, Any] = {"seed": seed, "train_seconds": round(seconds, 1),
                                   "accuracy": {t: accuracy(out, held[t], cot=names != ["answers"]) for t in TASKS}}
            run["accuracy"]["mix"] = statistics.fmean(run["accuracy"].values())
            ev = evaluate([stores["add"], stores["sub"]], out, answers=False)
            run["kd_loss"] = {"add": ev["teachers"][0]["kd_loss"], "sub": ev["teachers"][1]["kd_loss"], "mixture": ev["kd_loss"]}
            runs[name].append(run)
            print(f"{name}, seed {seed}: {run}", file=sys.stderr, flush=True)

    def median(name: str, *keys: str) -> float:
        values = []
        for run in runs[name]:
            value: Any = run
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    report = {"settings": vars(args), "results": results, "students": runs, "seconds": round(time.time() - started, 1)}
    print(f"\n{args.problems} stored problems (half additions, half subtractions), {args.eval_problems} held-out "
          f"problems of each task; students: 2 layers, width {args.student_hidden}, {args.steps} steps, batch 32, "
          f"lr {args.lr}, alpha {args.alpha}; medians over {args.seeds} seed(s)\n")
    print("| model | accuracy: additions | subtractions | mix | held-out KD loss vs addition teacher "
          "| vs subtraction teacher | vs their mixture |")
    print("|---|---|---|---|---|---|---|")
    for task in TASKS:
        acc = results[f"teacher {task}"]["accuracy"]
        print(f"| teacher: {'addition' if task == 'add' else 'subtraction'} only | {acc['add']:.1%} | {acc['sub']:.1%} "
              f"| {(acc['add'] + acc['sub']) / 2:.1%} | — | — | — |")
    for name in students:
        accs = [median(name, "accuracy", t) for t in (*TASKS, "mix")]
        kds = [median(name, "kd_loss", t) for t in ("add", "sub", "mixture")]
        print(f"| student: {name} | " + " | ".join(f"{a:.1%}" for a in accs) + " | "
              + " | ".join(f"{k:.3f}" for k in kds) + " |")
    for task, m in results["mixture"].items():
        print(f"\n{task}: over {m['positions']:,} stored positions the equal-weight mixture's top-1 is the true token at "
              f"{m['mixture_top1_true']:.1%} (the task's own teacher: {m['own_teacher_top1_true']:.1%}); its two most "
              f"likely tokens lie within 0.1 of each other at {m['mixture_near_tie']:.1%}", end="")
    print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
