"""`potstill train` and `potstill eval`.

Their settings, with their flags, help and defaults, are `TrainConfig`'s and `EvalConfig`'s fields
(student_train/config.py); only the options that are not settings are declared here.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import typer

from potstill.cli.options import CONFIG_HELP, threads_option
from potstill.cli.threads import apply_threads, resolve_threads, use_threads
from potstill.phases import Phases
from potstill.settings import load_settings, settings_options
from potstill.student_train.config import EvalConfig, TrainConfig
from potstill.student_train.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("train")
    @settings_options(TrainConfig)
    def train(
        config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
        threads: str = threads_option(TrainConfig().num_workers),
        *,
        flags: dict[str, Any],
    ) -> None:
        """Train a student from a store (or several teachers' stores) with sparse KD (no teacher is loaded).

        Several teachers, each store made over the same prompts: the student learns their weighted mixture,
        e.g. `potstill train --store add.store --store sub.store --teacher-weights 2,1 --student ./init --out
        ./student`; `potstill eval` with the same stores measures it against the mixture and each teacher."""
        cfg = TrainConfig.build(config, flags)
        count = resolve_threads(threads, loader_workers=cfg.num_workers)  # the loader's workers need CPUs too
        # Each start-up phase on stderr as it begins, the first within a second; under torchrun, rank 0's alone.
        phases = Phases(show=os.environ.get("RANK", "0") == "0")
        _read_published(cfg, phases)
        with phases.phase("import torch, transformers"):
            apply_threads(count)  # before torch starts
            from potstill.student_train.trainer import REPORT_FILE
            from potstill.student_train.trainer import train as run_training

        report = run_training(cfg, phases=phases)
        if "final_eval" not in report:  # a non-main rank: the main one reports
            return
        ev = report["final_eval"]
        typer.echo(f"trained {report['global_step']} steps; saved the student to {cfg.out} ({REPORT_FILE})")
        typer.echo("start-up: " + phases.format())
        if ev.get("kd_loss") is not None:
            typer.echo(f"held-out: {_format_eval(ev)}" + (f"; {ev['note']}" if ev.get("note") else ""))
            _echo_teachers(ev)
        else:
            typer.echo(f"held-out: {ev.get('note') or 'none'}")

    @app.command("eval")
    @settings_options(EvalConfig)
    def eval_(
        threads: str = threads_option(),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
        *,
        flags: dict[str, Any],
    ) -> None:
        """Held-out metrics of a student against the stored teacher: kd_loss, top-1 agreement, perplexity, answer accuracy."""
        cfg = load_settings(EvalConfig, None, flags, error=ConfigError)
        _read_published(cfg)
        use_threads(threads)
        from potstill.student_train.evaluation import evaluate

        result = evaluate(
            cfg.stores if len(cfg.stores) > 1 else cfg.stores[0],
            cfg.student,
            teacher_weights=TrainConfig.weights(cfg),  # type: ignore[arg-type]
            eval_fraction=cfg.eval_fraction,
            max_records=cfg.max_records,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            answers=cfg.answers,
            device=cfg.device,
        )
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        elif result["records"] == 0:
            typer.echo(f"no held-out records in {', '.join(cfg.stores)} at eval fraction {result['eval_fraction']}"
                       + (f": {result['note']}" if result.get("note") else ""))
        else:
            typer.echo(_format_eval(result))
            _echo_teachers(result)


def _read_published(cfg: TrainConfig | EvalConfig, phases: Phases | None = None) -> None:
    """A --store that is a published folder (`potstill store publish`, local, any fsspec URL or
    hf://datasets/OWNER/NAME) trains from the store it was made from, rebuilt once in the cache."""
    def local_store(url: str) -> bool:  # told apart without importing the store package (start-up stays quick)
        path = url.removeprefix("file://")
        return "://" not in path and not os.path.isfile(os.path.join(path, "published.json"))

    if all(local_store(url) for url in cfg.stores):
        return
    from potstill.store.published import is_published, store_from_published

    published = [url for url in cfg.stores if is_published(url)]
    if published:
        with phases.phase("rebuild the published dataset's store") if phases else contextlib.nullcontext():
            local = {url: store_from_published(url) for url in published}
        cfg.store = [local.get(url, url) for url in cfg.stores]
        if isinstance(cfg, TrainConfig):
            cfg.hidden_from = local.get(cfg.hidden_from, cfg.hidden_from)


def _format_eval(ev: dict) -> str:
    parts = [
        f"kd_loss {ev['kd_loss']:.4f}" + (" (vs sampled targets)" if ev.get("kd_target") == "sampled" else "")
        + (f" (vs the mixture of {len(ev['teachers'])} teachers)" if ev.get("teachers") else ""),
        f"top1_agreement {ev['top1_agreement']:.4f}",
        f"perplexity {ev['perplexity']:.3f}",
    ]
    if ev.get("answer_accuracy") is not None:
        parts.append(f"answer_accuracy {ev['answer_accuracy']:.4f} ({ev['answers_correct']}/{ev['answers_checked']})")
    parts.append(f"({ev['records']} records, {ev['scored_tokens']} scored tokens)")
    return ", ".join(parts)


def _echo_teachers(ev: dict) -> None:
    """Several teachers: the line above is against their mixture; one line per teacher alone."""
    for teacher in ev.get("teachers", []):
        if teacher.get("kd_loss") is not None:
            typer.echo(f"  vs {teacher['store']} alone (weight {teacher['weight']:.3g}): kd_loss {teacher['kd_loss']:.4f}, "
                       f"top1_agreement {teacher['top1_agreement']:.4f}, perplexity {teacher['perplexity']:.3f}")
