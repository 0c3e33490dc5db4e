"""`potstill generate`: run a teacher over a prompt set and fill a store.

Its settings, with their flags, help and defaults, are `GenerateConfig`'s fields (teacher_gen/config.py);
only the options that are not settings are declared here. torch and transformers are imported only
when the command runs, as its first start-up phase.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from potstill.cli.options import CONFIG_HELP, threads_option
from potstill.cli.threads import apply_threads, resolve_threads
from potstill.phases import Phases
from potstill.settings import settings_options
from potstill.teacher_gen.config import GenerateConfig


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @settings_options(GenerateConfig)
    def generate(
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        threads: str = threads_option(),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        *,
        flags: dict[str, Any],
    ) -> None:
        """Run a teacher over a prompt set and write top-k log-probs or sampled targets (+ hidden states) into a store."""
        settings = GenerateConfig.build(config, **flags)
        settings.validate()  # a mistake in the options is one line, before any phase starts
        count = resolve_threads(threads)  # checked before any phase starts, like the settings
        # An uncached hub teacher with no network: one line at once, not after the imports and retries.
        from potstill.teacher_gen.model_info import check_hub_teacher

        check_hub_teacher(settings.teacher, settings.revision)
        # Within a second of starting: importing torch and transformers alone takes seconds.
        phases = Phases(show=settings.progress)
        with phases.phase("import torch, transformers"):
            apply_threads(count)
            # transformers is lazy: its classes would load in the next phases, which then look slow.
            from transformers import AutoConfig, AutoTokenizer, PreTrainedModel  # noqa: F401

            from potstill.teacher_gen.runner import generate as run_generate

        if settings.executor == "ray":
            from potstill.teacher_gen.ray_executor import generate_on_ray

            summary = generate_on_ray(settings, phases=phases)
        else:
            summary = run_generate(settings, phases=phases)
        typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
