"""What every `potstill` command shares in its options besides its settings: `--threads`, `--config`,
plain help.

A command's settings become options through potstill/settings.py, with their defaults written into
the help in click's own format, `[default: X]`. Help is plain text (no rich markup), so brackets and
quotes show as typed.
"""

from __future__ import annotations

from typing import Any

import typer

from potstill.cli.threads import threads_help

# Plain click help on every (sub)command: rich markup would eat "[default: …]" and "[answer]".
APP_SETTINGS: dict[str, Any] = {"rich_markup_mode": None, "pretty_exceptions_enable": False,
                                "add_completion": False, "no_args_is_help": True,
                                "context_settings": {"max_content_width": 120, "help_option_names": ["-h", "--help"]}}
# The base class of the usage errors typer raises (a flag it refused): click's ClickException, which
# typer >= 0.29 carries in its own copy of click, so it is found through a class both versions have.
UsageErrorBase: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
CONFIG_HELP = "YAML, TOML or JSON file of settings (flags override it)."


def threads_option(loader_workers: int = 0) -> Any:
    """`--threads N|auto` (default auto), the same on every command that runs torch."""
    return typer.Option("auto", "--threads", metavar="N|auto", help=threads_help(loader_workers))
