"""`potstill demo`: the two-phase story end to end on a built-in task (see cli/demo/run.py)."""

from __future__ import annotations

import typer

from potstill.cli.options import threads_option
from potstill.cli.threads import resolve_threads


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: str = typer.Option("potstill-demo", "--out", help="Folder for the stores, students and report.json."),
        student_steps: int = typer.Option(600, "--student-steps", help="Optimizer steps of each student."),
        train_problems: int = typer.Option(2400, "--train-problems", help="Problems the teacher solves into the store."),
        eval_problems: int = typer.Option(300, "--eval-problems", help="Held-out problems every model is scored on."),
        threads: str = threads_option(),  # the demo's students train with no loader workers
    ) -> None:
        """Distil a 4-digit-addition teacher into two students (KD vs answers only) and compare them, offline, on CPU."""
        from potstill.cli.demo.run import DemoConfig, run_demo

        run_demo(DemoConfig(out=out, student_steps=student_steps, train_problems=train_problems,
                            eval_problems=eval_problems, threads=resolve_threads(threads)), app)
