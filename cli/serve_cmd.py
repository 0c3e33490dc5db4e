"""`potstill serve`: keep a teacher loaded and run generation jobs from a persistent queue over HTTP.

Its settings, with their flags, help and defaults, are `ServeConfig`'s fields
(teacher_gen/service/settings.py). FastAPI, uvicorn, torch and transformers are imported when it runs.
"""

from __future__ import annotations

from typing import Any

import typer

from potstill.cli.options import CONFIG_HELP, threads_option
from potstill.cli.threads import use_threads
from potstill.settings import settings_options
from potstill.teacher_gen.service.settings import ServeConfig


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @settings_options(ServeConfig)
    def serve(
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        threads: str = threads_option(),
        *,
        flags: dict[str, Any],
    ) -> None:
        """Serve a teacher: run `potstill generate` jobs one after another from a queue that survives restarts."""
        settings = ServeConfig.build(config, **flags)
        use_threads(threads)

        from potstill.teacher_gen.service.server import serve as run_service

        run_service(settings)
