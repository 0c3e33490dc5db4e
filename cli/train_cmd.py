"""`potstill train` and `potstill eval`.

Train's settings, with their flags, help and defaults, are `TrainConfig`'s fields
(student_train/config.py); only the options that are not settings are declared here.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from potstill.cli.options import CONFIG_HELP, REQUIRED, alias, pick, threads_option
from potstill.cli.threads import use_threads
from potstill.settings import settings_options
from potstill.store.errors import PotstillError
from potstill.student_train.config import TrainConfig


def register(app: typer.Typer) -> None:
    @app.command("train")
    @settings_options(TrainConfig)
    def train(
        config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
        threads: str = threads_option(TrainConfig().num_workers),
        *,
        flags: dict[str, Any],
    ) -> None:
        """Train a student from a store with sparse KD (the teacher is never loaded)."""
        cfg = TrainConfig.build(config, flags)
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
