"""`potstill student init`: a student made from its teacher (student_train/student_init.py).

Its settings, with their flags, help and defaults, are `StudentInitConfig`'s fields; only
`--threads` is declared here."""

from __future__ import annotations

from typing import Any

import typer

from potstill.cli.options import APP_SETTINGS, threads_option
from potstill.cli.threads import use_threads
from potstill.settings import load_settings, settings_options
from potstill.student_train.errors import ConfigError, TrainError
from potstill.student_train.student_init import StudentInitConfig
from potstill.teacher_gen.model_info import check_hub_teacher

app = typer.Typer(help="Make a student to train: from its teacher, sharing the teacher's tokenizer.", **APP_SETTINGS)


@app.command("init")
@settings_options(StudentInitConfig)
def init(threads: str = threads_option(), *, flags: dict[str, Any]) -> None:
    """Write a student checkpoint made from the teacher: its embeddings, head and the kept layers copied,
    optionally narrower; it loads in plain transformers and trains with `potstill train --student`."""
    cfg = load_settings(StudentInitConfig, None, flags, error=ConfigError)
    check_hub_teacher(cfg.teacher, cfg.revision or None, error=TrainError)  # offline: refused before torch loads
    use_threads(threads)
    from potstill.student_train.student_init import init_student

    report = init_student(cfg, log=lambda message: typer.echo(message, err=True))
    partial = f", {len(report.sliced)} cut to size" if report.sliced else ""
    fresh = f", {len(report.initialised)} initialised afresh" if report.initialised else ""
    typer.echo(f"wrote {cfg.out}: {len(report.layers)} of the teacher's {report.teacher_layers} layers "
               f"({','.join(map(str, report.layers))}), {report.parameters:,} parameters "
               f"(teacher {report.teacher_parameters:,}); {len(report.copied)} tensors copied{partial}{fresh}")
