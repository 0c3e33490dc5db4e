"""`potstill demo`: the whole two-phase story, end to end, offline, on a laptop-class CPU.

1. the teacher: a small Llama that solves 4-digit additions by writing out the carries (trained
   by `cli/demo/teacher.py`, shipped as a checkpoint because training it takes a few minutes);
2. phase one: `potstill generate --mode generate --rationale` runs the teacher over training
   problems into a store (top-k log-probs + log tail + one hidden layer + rationales/answers);
   a second, answers-only store (`--mode score` over "The answer is N.") feeds the baseline;
3. phase two: two students of one size from one init, the same steps: `potstill train` with sparse
   KD + rationales + hidden states from the rationale store, and `potstill train --alpha 1`
   (cross-entropy only) on the teacher's final answers alone;
4. every model answers held-out problems none of them trained on; a table, DIR/report.json and
   DIR/report.png (the students' loss curves, the accuracies and the table as a picture).

Every step runs the real `potstill` commands in-process — the same code paths a user runs.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from typing import Any

import typer

from potstill.cli.demo import arithmetic
from potstill.cli.demo.teacher import model_config, solve_accuracy
from potstill.settings import check_settings, setting
from potstill.store.errors import PotstillError

CHECKPOINT = os.path.join(os.path.dirname(__file__), "teacher_checkpoint")


@dataclass
class DemoConfig:
    """Settings of `potstill demo`: each field is its flag, help and default (the tuned demo)."""

    out: str = setting("potstill-demo", help="Folder for the stores, students and report.json.")
    train_problems: int = setting(2400, help="Problems the teacher solves into the store.")
    eval_problems: int = setting(300, help="Held-out problems every model is scored on.")
    student_steps: int = setting(600, help="Optimizer steps of each student.")
    batch_size: int = setting(32, help="Records per optimizer step of each student.")
    lr: float = setting(3e-3, help="Peak learning rate of each student (cosine schedule).")
    student_hidden: int = setting(64, help="Width of both students.")
    student_layers: int = setting(2, help="Layers of both students.")
    alpha: float = setting(0.2, help="KD student: weight of cross-entropy on the teacher's tokens (the rest is sparse KD).")
    top_k: int = setting(16, help="Teacher log-probs stored per position.")
    teacher_layer: int = setting(2, help="Teacher hidden layer stored and matched (of 4).")
    student_layer: int = setting(1, help="Student layer matched to it, through a learned projection.")
    # MSE on raw activations is large next to KL: a small weight keeps it a regulariser
    hidden_weight: float = setting(0.01, help="Weight of the hidden-state loss of the KD student.")
    seed: int = setting(0, help="Seed of the problems and the students' init.")

    def validate(self) -> DemoConfig:
        check_settings(self)
        for flag, value in (("--train-problems", self.train_problems), ("--eval-problems", self.eval_problems),
                            ("--student-steps", self.student_steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise PotstillError(f"{flag} must be at least 1, got {value}")
        return self


def run_demo(config: DemoConfig, app: typer.Typer, threads: int = 0, log: Any = print) -> dict[str, Any]:
    """Run the demo. Each step runs a `potstill` command in-process through `app`, the app the demo
    command is registered on (passed in, not imported: the demo is one of that app's commands), with
    torch on `threads` threads (0: auto, cli/threads.py)."""
    from potstill.cli.threads import apply_threads, auto_threads

    threads = apply_threads(threads or auto_threads())  # before torch is imported
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = os.path.abspath(config.out)
    os.makedirs(out, exist_ok=True)
    _clear_previous_run(out)
    started = time.time()
    commands: list[list[str]] = []

    def step(title: str) -> None:
        log(f"\n[{time.time() - started:5.0f}s] {title}")

    def potstill(*args: str) -> None:
        commands.append(["potstill", *args])
        log("  $ " + shlex.join(["potstill", *args]))
        _run_cli(app, list(args))

    # -- the task ---------------------------------------------------------------------------------
    step("1/5  task: 4-digit addition; the teacher is a 4-layer Llama that writes out the carries")
    train_pairs = arithmetic.problems(config.seed + 1, config.train_problems)
    eval_pairs = arithmetic.problems(config.seed + 2, config.eval_problems, exclude=set(train_pairs))
    prompts = os.path.join(out, "train_prompts.jsonl")
    _write_jsonl(prompts, [{"id": f"p{i:05d}", "prompt": arithmetic.question(a, b)} for i, (a, b) in enumerate(train_pairs)])
    log(f"  {len(train_pairs)} training problems -> {prompts}; {len(eval_pairs)} held-out problems")

    # -- phase one: the teacher writes the store --------------------------------------------------
    step("2/5  phase one: the teacher solves the training problems into a store (rationale mode)")
    store = os.path.join(out, "rationale.store")
    potstill(
        "generate", "--teacher", CHECKPOINT, "--prompts", prompts, "--out", store,
        "--mode", "generate", "--rationale", "--rationale-template", "{prompt}" + arithmetic.COT_TRIGGER,
        "--sampling-temperature", "0", "--max-new-tokens", "96", "--targets", "topk", "--top-k", str(config.top_k),
        "--hidden-layers", str(config.teacher_layer), "--shard-records", "512", "--hidden-chunk-tokens", "4096",
        "--device", "cpu", "--threads", str(threads),
    )
    answers = _teacher_answers(store)
    answer_prompts = os.path.join(out, "answer_prompts.jsonl")
    _write_jsonl(answer_prompts, [
        {"id": rid, "prompt": prompt, "completion": f"The answer is {answer}."}
        for rid, (prompt, answer) in sorted(answers.items()) if answer is not None
    ])
    answer_store = os.path.join(out, "answers.store")
    potstill(
        "generate", "--teacher", CHECKPOINT, "--prompts", answer_prompts, "--out", answer_store,
        "--mode", "score", "--targets", "topk", "--top-k", str(config.top_k), "--device", "cpu",
        "--threads", str(threads),
    )

    # -- phase two: two students from one init -----------------------------------------------------
    step("3/5  phase two: two students of one size, one init, the same steps (the teacher is not loaded)")
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    init = os.path.join(out, "student_init")
    torch.manual_seed(config.seed)
    LlamaForCausalLM(model_config(len(tokenizer), config.student_hidden, config.student_layers)).save_pretrained(init)
    tokenizer.save_pretrained(init)
    common = [
        "--student", init, "--max-steps", str(config.student_steps), "--batch-size", str(config.batch_size),
        "--lr", str(config.lr), "--lr-scheduler", "cosine", "--warmup-steps", str(config.student_steps // 10),
        "--seed", str(config.seed), "--num-workers", "0", "--save-steps", str(config.student_steps),
        "--logging-steps", str(max(1, min(50, config.student_steps // 12))),  # 50 at the default 600 steps
        "--report-to", "none", "--eval-max-records", "0", "--no-bf16",
        "--threads", str(threads),
    ]
    kd_dir, base_dir = os.path.join(out, "student_kd"), os.path.join(out, "student_baseline")
    potstill(
        "train", "--store", store, "--out", kd_dir, *common,
        "--loss", "forward_kl", "--alpha", str(config.alpha),
        "--hidden-map", f"{config.student_layer}:{config.teacher_layer}", "--hidden-loss", "mse",
        "--hidden-weight", str(config.hidden_weight),
    )
    potstill("train", "--store", answer_store, "--out", base_dir, *common, "--alpha", "1.0")

    # -- held-out accuracy -------------------------------------------------------------------------
    step(f"4/5  accuracy on {len(eval_pairs)} held-out problems none of the models trained on")
    results: dict[str, dict[str, Any]] = {}
    for key, path, cot in (("teacher", CHECKPOINT, True), ("student_kd", kd_dir, True), ("student_baseline", base_dir, False)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        accuracy = solve_accuracy(model, tokenizer, eval_pairs, cot=cot)
        results[key] = {"accuracy": accuracy, "params": sum(p.numel() for p in model.parameters()), "model": path}
        log(f"  {key:<17} accuracy {accuracy:.3f}")
    results["teacher"]["store"] = None
    results["student_kd"]["store"] = _store_summary(store)
    results["student_baseline"]["store"] = _store_summary(answer_store)

    # -- report -----------------------------------------------------------------------------------
    step("5/5  report")
    report = {
        **results,
        "margin": results["student_kd"]["accuracy"] - results["student_baseline"]["accuracy"],
        "settings": {**asdict(config), "threads": threads},
        "seconds": round(time.time() - started, 1),
        "commands": [shlex.join(c) for c in commands],
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    _write_picture(report, os.path.join(out, "report.png"))
    log(format_table(report))
    log(f"\nreport: {os.path.join(out, 'report.json')} and report.png  ({report['seconds']:.0f} s in all)")
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = ROWS
    lines = [f"{'model':<42}{'params':>10}{'held-out accuracy':>20}{'store bytes/token':>20}"]
    for key, label in rows:
        r = report[key]
        store = r.get("store")
        per_token = "-" if store is None else f"{store['bytes_per_token']:.0f}"
        lines.append(f"{label:<42}{r['params']:>10,}{r['accuracy']:>20.1%}{per_token:>20}")
    for key, _label in rows:  # the store's byte figures, as `potstill store info` prints them
        store = report[key].get("store")
        if store is not None and store.get("sizes"):
            lines.append(f"{key} store: {store['sizes']}")
    return "\n".join(lines)


ROWS = (("teacher", "teacher (writes the store)"), ("student_kd", "student: sparse KD + rationales + hidden"),
        ("student_baseline", "student: final answers only"))


def _write_picture(report: dict[str, Any], path: str) -> None:
    """report.png: both students' loss curves (from their training reports), the accuracies as bars
    and the table `format_table` prints."""
    from potstill.student_train.plots import write_comparison

    curves = {}
    for key, label in (("student_kd", "KD student"), ("student_baseline", "baseline")):
        with open(os.path.join(report[key]["model"], "training_report.json")) as f:
            curves[label] = json.load(f)["loss_curve"]
    table = []
    for key, label in ROWS:
        r = report[key]
        per_token = "-" if r.get("store") is None else f"{r['store']['bytes_per_token']:.0f}"
        table.append([label, f"{r['params']:,}", f"{r['accuracy']:.1%}", per_token])
    write_comparison(path, curves, table, ["model", "params", "held-out accuracy", "store bytes/token"],
                     {"teacher": report["teacher"]["accuracy"], "KD student": report["student_kd"]["accuracy"],
                      "baseline": report["student_baseline"]["accuracy"]})


def _run_cli(app: typer.Typer, args: list[str]) -> None:
    """Run a `potstill` command in-process, exactly as the console script would."""
    from potstill.cli.options import UsageErrorBase
    from potstill.store.errors import PotstillError

    try:
        app(args, standalone_mode=False)
    except typer.Exit as e:
        code = getattr(e, "exit_code", getattr(e, "code", 1))
        if code:
            raise PotstillError(f"potstill {args[0]} exited with {code}") from None
    except UsageErrorBase as e:  # a flag typer refused
        raise PotstillError(f"potstill {args[0]}: {e.format_message()}") from None


OUTPUTS = ("train_prompts.jsonl", "answer_prompts.jsonl", "rationale.store", "answers.store", "student_init",
           "student_kd", "student_baseline", "report.json", "report.png")


def _clear_previous_run(out: str) -> None:
    """A rerun into the same folder starts over: a store would otherwise resume, not restart, and keep
    records made with other settings. Only the demo's own outputs are removed, never anything else."""
    import shutil

    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _teacher_answers(store_url: str) -> dict[str, tuple[str, str | None]]:
    from potstill.store import open_store

    store = open_store(store_url)
    return {r.id: (r.prompt, r.answer) for r in store.iter_records()}


def _store_summary(store_url: str) -> dict[str, Any]:
    from potstill.share import store_info
    from potstill.store import open_store

    info = store_info(open_store(store_url))
    return {"path": store_url, "records": info["records"], "tokens": info["tokens"],
            "bytes": info["bytes"], "bytes_per_token": info["bytes_per_token"],
            "target_bytes_per_scored_token": info["target_bytes_per_scored_token"], "sizes": info["sizes_line"]}


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
