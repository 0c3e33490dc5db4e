"""`potstill train` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train() -> None:
        """Not built yet."""
        typer.echo("potstill train: not built yet")
        raise typer.Exit(1)
