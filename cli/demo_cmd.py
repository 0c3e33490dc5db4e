"""`potstill demo`: the two-phase story end to end on a built-in task (see cli/demo/run.py).

Its settings are `DemoConfig`'s fields; only --threads is declared here."""

from __future__ import annotations

from typing import Any

import typer

from potstill.cli.demo.run import DemoConfig
from potstill.cli.options import threads_option
from potstill.cli.threads import resolve_threads
from potstill.settings import load_settings, settings_options


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @settings_options(DemoConfig)
    def demo(
        threads: str = threads_option(),  # the demo's students train with no loader workers
        *,
        flags: dict[str, Any],
    ) -> None:
        """Distil a 4-digit-addition teacher into two students (KD vs answers only) and compare them, offline, on CPU."""
        from potstill.cli.demo.run import run_demo

        run_demo(load_settings(DemoConfig, None, flags), app, threads=resolve_threads(threads))
