"""Entry point of the `potstill` command.

Every user mistake surfaces as a `PotstillError` and is printed here as one line with a
non-zero exit; heavy imports (torch, transformers) happen inside the commands that need them, after
`--threads` is applied (cli/threads.py).
"""

from __future__ import annotations

import sys

import typer

from potstill.cli.threads import prepare_environment

prepare_environment()  # OpenMP's wait policy is read once, when torch loads: set it before any import of torch

from potstill.cli import store_cmd, student_cmd  # noqa: E402
from potstill.cli.options import APP_SETTINGS  # noqa: E402
from potstill.store.errors import PotstillError  # noqa: E402

app = typer.Typer(
    name="potstill",
    help="Offline, two-phase knowledge distillation: capture a teacher once into a store, train students from it.",
    **APP_SETTINGS,
)
app.add_typer(store_cmd.app, name="store")
app.add_typer(student_cmd.app, name="student")


def _print_version(value: bool) -> None:
    if value:
        from potstill import __version__

        typer.echo(f"potstill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                 help="Print potstill's version and exit."),
) -> None:
    pass


def _register() -> None:
    # Imported here so each command module stays independent of the others.
    from potstill.cli import demo_cmd, generate_cmd, jobs_cmd, serve_cmd, train_cmd

    generate_cmd.register(app)
    train_cmd.register(app)
    demo_cmd.register(app)
    serve_cmd.register(app)
    jobs_cmd.register(app)


_register()


def storage_failure(e: BaseException) -> str | None:
    """One line for a failure of the disk or the object store under any command (full, read-only,
    S3 errors after the client's retries, timeouts), or None for anything else. What was committed
    stays whole; a rerun goes on from there."""
    if isinstance(e, OSError):  # (TimeoutError, and s3fs's translation of S3 errors, among them)
        return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e) or type(e).__name__
    boto = sys.modules.get("botocore.exceptions")  # (loaded only when an object store was used)
    if boto is not None and isinstance(e, boto.BotoCoreError):
        return f"the object store failed: {e}"
    return None


def main() -> None:
    try:
        app()
    except PotstillError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except Exception as e:
        line = storage_failure(e)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
