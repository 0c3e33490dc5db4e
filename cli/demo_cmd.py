"""`potstill demo` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo() -> None:
        """Not built yet."""
        typer.echo("potstill demo: not built yet")
        raise typer.Exit(1)
