"""`potstill train` and `potstill eval`.

Every train flag defaults to "not given" so that `--config FILE` values are only overridden by flags
the user actually typed; the real defaults live in one place, `student_train.config.TrainConfig`.
"""

from __future__ import annotations

import json

import typer

from potstill.cli.options import REQUIRED, REQUIRED_OR_CONFIG, alias, pick, threads_option, with_default
from potstill.cli.threads import use_threads
from potstill.store.errors import PotstillError
from potstill.student_train.config import TrainConfig, build_config

D = TrainConfig()  # the defaults, shown in --help


def _h(text: str, name: str, flag: str | None = None) -> str:
    return with_default(text, getattr(D, name), flag)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: str | None = typer.Option(None, "--config", help="YAML/TOML/JSON file of settings; flags override it."),
        store: str | None = typer.Option(None, "--store", help="Store to train from, path or URL.  " + REQUIRED_OR_CONFIG),
        student: str | None = typer.Option(None, "--student", help="Student: model folder to start from, or a config (folder or .json) to build one.  "
                                    + REQUIRED_OR_CONFIG),
        out: str | None = typer.Option(None, "--out", help="Folder to write: student, tokenizer, projections, checkpoints, report.  "
                                + REQUIRED_OR_CONFIG),
        max_steps: int | None = typer.Option(None, "--max-steps", help=_h("Optimizer steps (> 0 overrides --epochs).", "max_steps")),
        epochs: float | None = typer.Option(None, "--epochs", help=_h("Passes over the training records.", "epochs")),
        lr: float | None = typer.Option(None, "--lr", help=_h("Peak learning rate.", "lr")),
        lr_scheduler: str | None = typer.Option(None, "--lr-scheduler", help=_h("transformers scheduler name.", "lr_scheduler")),
        warmup_steps: int | None = typer.Option(None, "--warmup-steps", help=_h("Warm-up steps.", "warmup_steps")),
        weight_decay: float | None = typer.Option(None, "--weight-decay", help=_h("AdamW weight decay.", "weight_decay")),
        max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help=_h("Gradient clipping norm (0: off).", "max_grad_norm")),
        head_lr_scale: float | None = typer.Option(None, "--head-lr-scale", help=_h("The output layer's learning rate, a multiple of --lr.", "head_lr_scale")),
        batch_size: int | None = typer.Option(None, "--batch-size", help=_h("Records per micro-batch per rank.", "batch_size")),
        grad_accum: int | None = typer.Option(None, "--grad-accum", help=_h("Micro-batches per optimizer step.", "grad_accum")),
        max_length: int | None = typer.Option(None, "--max-length", help=_h("Truncate sequences to this many tokens (0: never).", "max_length")),
        loss: str | None = typer.Option(None, "--loss", help=_h("forward_kl | reverse_kl | jsd.", "loss")),
        beta: float | None = typer.Option(None, "--beta", help=_h("JSD teacher weight, 0 < beta < 1.", "beta")),
        temperature: float | None = typer.Option(None, "--temperature", help=_h("Distillation temperature T (loss scaled by T²).", "temperature")),
        alpha: float | None = typer.Option(None, "--alpha", help=_h("Weight of CE on the hard tokens; KD gets 1 - alpha.", "alpha")),
        tail: bool | None = typer.Option(None, "--tail/--no-tail", help=_h("The tail (mass outside the top-K) as an extra bucket (else renormalise the top-K).", "tail", "--tail/--no-tail")),
        targets: str | None = typer.Option(None, "--targets", help=_h("topk | sampled | auto (sampled when the store has them and the loss is forward KL at T=1, else top-k).", "targets")),
        hidden_map: str | None = typer.Option(None, "--hidden-map", help=_h("'s:t,...' student hidden_states index : stored teacher layer.", "hidden_map")),
        hidden_loss: str | None = typer.Option(None, "--hidden-loss", help=_h("standardized_mse | cosine | mse (raw states: scale-dependent).", "hidden_loss")),
        hidden_weight: float | None = typer.Option(None, "--hidden-weight", help=_h("Weight of the hidden-state loss.", "hidden_weight")),
        relation_weight: float | None = typer.Option(None, "--relation-weight", help=_h("Weight of the token-relation loss (on the --hidden-map pairs).", "relation_weight")),
        rationale_mode: str | None = typer.Option(None, "--rationale-mode", help=_h("plain | multitask (distilling step-by-step).", "rationale_mode")),
        rationale_weight: float | None = typer.Option(None, "--rationale-weight", help=_h("Multitask: weight of the prompt -> rationale task.", "rationale_weight")),
        answer_marker: str | None = typer.Option(None, "--answer-marker", help=_h("Multitask: text between prompt and answer in the answer task.", "answer_marker")),
        seed: int | None = typer.Option(None, "--seed", help=_h("Seed of init, shard order and shuffle.", "seed")),
        shuffle_buffer: int | None = typer.Option(None, "--shuffle-buffer", help=_h("Shuffle buffer per loader worker (records).", "shuffle_buffer")),
        eval_fraction: float | None = typer.Option(None, "--eval-fraction", help=_h("Records held out by id hash.", "eval_fraction")),
        num_workers: int | None = typer.Option(None, "--num-workers", help=_h("DataLoader worker processes per rank.", "num_workers")),
        skip_bad_shards: bool | None = typer.Option(None, "--skip-bad-shards/--no-skip-bad-shards", help=_h("Leave out (and report) shards whose files or values fail their checks, instead of stopping.", "skip_bad_shards", "--skip-bad-shards/--no-skip-bad-shards")),
        bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help=_h("bfloat16 mixed precision.", "bf16", "--bf16/--no-bf16")),
        fp16: bool | None = typer.Option(None, "--fp16/--no-fp16", help=_h("float16 mixed precision.", "fp16", "--fp16/--no-fp16")),
        resume: bool | None = typer.Option(None, "--resume/--no-resume", help=_h("Continue from the latest checkpoint in --out.", "resume", "--resume/--no-resume")),
        resume_from: str | None = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder.  [default: none]"),
        save_steps: int | None = typer.Option(None, "--save-steps", help=_h("Checkpoint every N steps.", "save_steps")),
        save_total_limit: int | None = typer.Option(None, "--save-total-limit", help=_h("Checkpoints kept (0: all).", "save_total_limit")),
        logging_steps: int | None = typer.Option(None, "--logging-steps", help=_h("Log every N steps.", "logging_steps")),
        report_to: str | None = typer.Option(None, "--report-to", help=_h("tensorboard | none | other transformers integrations.", "report_to")),
        eval_max_records: int | None = typer.Option(None, "--eval-max-records", help=_h("Held-out records in the final eval (0: all).", "eval_max_records")),
        eval_max_new_tokens: int | None = typer.Option(None, "--eval-max-new-tokens", help=_h("Final eval: greedy generation length for answers.", "eval_max_new_tokens")),
        trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code/--no-trust-remote-code", help=_h("Allow the student's own modelling code.", "trust_remote_code", "--trust-remote-code/--no-trust-remote-code")),
        threads: str = threads_option(D.num_workers),
    ) -> None:
        """Train a student from a store with sparse KD (the teacher is never loaded)."""
        flags = {k: v for k, v in locals().items() if k not in ("config", "threads")}  # each None unless typed
        cfg = build_config(config, flags)
        use_threads(threads, loader_workers=cfg.num_workers)  # before torch starts: the loader's workers need CPUs too

        from potstill.student_train.trainer import REPORT_FILE
        from potstill.student_train.trainer import train as run_training

        report = run_training(cfg)
        if "final_eval" not in report:  # a non-main rank: the main one reports
            return
        ev = report["final_eval"]
        typer.echo(f"trained {report['global_step']} steps; saved the student to {cfg.out} ({REPORT_FILE})")
        if ev.get("kd_loss") is not None:
            typer.echo(f"held-out: {_format_eval(ev)}" + (f"; {ev['note']}" if ev.get("note") else ""))
        else:
            typer.echo(f"held-out: {ev.get('note') or 'none'}")

    @app.command("eval")
    def eval_(
        store: str = typer.Option(..., "--store", help="Store to evaluate against, path or URL."),
        student: str | None = typer.Option(None, "--student", help="Student folder (what potstill train wrote).  " + REQUIRED),
        model: str | None = alias("--model"),
        eval_fraction: float | None = typer.Option(None, "--eval-fraction", help="Held-out fraction.  [default: the model's training report, else 0.05]"),
        max_records: int = typer.Option(0, "--max-records", help="Evaluate at most N held-out records (0: all)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Records per forward pass."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Greedy generation length for answer accuracy."),
        no_answers: bool = typer.Option(False, "--no-answers", help="Skip answer accuracy (no generation)."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ...  [default: where the model loads]"),
        threads: str = threads_option(),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ) -> None:
        """Held-out metrics of a student against the stored teacher: kd_loss, top-1 agreement, perplexity, answer accuracy."""
        student = pick("--student", student, "--model", model)
        if not student:
            raise PotstillError("--student is required")
        use_threads(threads)
        from potstill.student_train.evaluation import evaluate

        result = evaluate(
            store,
            student,
            eval_fraction=eval_fraction,
            max_records=max_records,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            answers=not no_answers,
            device=device,
        )
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        elif result["records"] == 0:
            typer.echo(f"no held-out records in {store} at eval fraction {result['eval_fraction']}"
                       + (f": {result['note']}" if result.get("note") else ""))
        else:
            typer.echo(_format_eval(result))


def _format_eval(ev: dict) -> str:
    parts = [
        f"kd_loss {ev['kd_loss']:.4f}" + (" (vs sampled targets)" if ev.get("kd_target") == "sampled" else ""),
        f"top1_agreement {ev['top1_agreement']:.4f}",
        f"perplexity {ev['perplexity']:.3f}",
    ]
    if ev.get("answer_accuracy") is not None:
        parts.append(f"answer_accuracy {ev['answer_accuracy']:.4f} ({ev['answers_correct']}/{ev['answers_checked']})")
    parts.append(f"({ev['records']} records, {ev['scored_tokens']} scored tokens)")
    return ", ".join(parts)
