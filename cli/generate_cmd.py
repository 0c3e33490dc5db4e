"""`potstill generate` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate() -> None:
        """Not built yet."""
        typer.echo("potstill generate: not built yet")
        raise typer.Exit(1)
