"""`potstill jobs`: submit generation jobs to a `potstill serve` and follow them.

    potstill jobs submit --server URL --prompts P --out STORE [any potstill generate flag]   # prints the id
    potstill jobs status ID [--json]      potstill jobs list      potstill jobs cancel ID      potstill jobs wait ID

The server is --server or $POTSTILL_SERVER; the bearer token $POTSTILL_TOKEN or --token-file.
Generate flags are read from `GenerateConfig`'s settings (--top-k 8, --hidden-layers 4,8,-1,
--no-append-eos, old spellings too), so every `potstill generate` setting works here without a list to
keep in sync.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import typer

from potstill.cli.options import APP_SETTINGS, alias, pick
from potstill.settings import by_field_name, cli_type, fields_of, flag_of, info_of, note
from potstill.teacher_gen.config import GenerateConfig, coerce_setting
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.service.settings import (
    DEFAULT_SERVER,
    SERVER_ENV,
    TOKEN_ENV,
    ServiceError,
    read_token,
)

app = typer.Typer(help="Submit generation jobs to a `potstill serve` and follow them.", **APP_SETTINGS)

ServerOpt = typer.Option(DEFAULT_SERVER, "--server", envvar=SERVER_ENV, help="URL of the potstill service.")
TokenFileOpt = typer.Option(None, "--token-file", help=f"File holding the bearer token.  [default: ${TOKEN_ENV}]")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")
# Settings the service decides: a client cannot send them.
NOT_SENT = ("progress",)


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="jobs")


def _client(server: str, token_file: str | None) -> Any:
    from potstill.teacher_gen.service.client import ServiceClient

    return ServiceClient(server, read_token(token_file))


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    from potstill.teacher_gen.service.client import describe

    typer.echo(json.dumps(status, indent=2) if as_json else describe(status))


def _fail_unless_done(status: dict[str, Any]) -> None:
    if status["state"] != "done":
        reason = f": {status['error']}" if status.get("error") else ""
        raise ServiceError(f"job {status['id']} {status['state']}{reason}")


def parse_generate_flags(args: list[str]) -> dict[str, Any]:
    """`--top-k 8 --no-append-eos --hidden-layers=4,8` -> {"top_k": 8, "append_eos": False, ...}."""
    flags: dict[str, tuple[str, Any, bool]] = {}  # flag -> (setting, type hint, an old spelling)
    for f, hint in fields_of(GenerateConfig):
        if f.name not in NOT_SENT:
            flags[flag_of(f)] = (f.name, hint, False)
            flags.update({old: (f.name, hint, True) for old in info_of(f).aliases})
    settings: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            raise ServiceError(f"unexpected argument {arg!r}")
        flag, has_value, value = arg.partition("=")
        negated = flag.startswith("--no-") and "--" + flag[5:] in flags and cli_type(flags["--" + flag[5:]][1]) is bool
        if flag not in flags and not negated:
            raise ServiceError(f"unknown option {flag}: not a potstill generate setting (see potstill generate --help)")
        name, hint, old = flags["--" + flag[5:]] if negated else flags[flag]
        if old:
            note(f"{flag} is now {flag_of(next(f for f in dataclasses.fields(GenerateConfig) if f.name == name))}")
        if negated or (cli_type(hint) is bool and not has_value):
            settings[name] = not negated
            continue
        if not has_value:
            if i >= len(args):
                raise ServiceError(f"{flag} needs a value")
            value = args[i]
            i += 1
        settings[name] = coerce_setting(name, value)
    return settings


def _absolute(location: str) -> str:
    """Local paths are sent absolute: the service does not share our working directory."""
    return location if "://" in location or os.path.isabs(location) else os.path.abspath(location)


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    prompts: str = typer.Option(None, help="Prompt set on the server (path or URL); a relative path is made absolute.  "
                                "[required]"),
    out: str = typer.Option(None, "--out", help="Store the job writes on the server, path or URL.  [required]"),
    store: str = alias("--store"),
    config: str = typer.Option(None, "--config", help="YAML or TOML file of generate settings (flags override it).  [default: none]"),
    server: str = ServerOpt,
    token_file: str = TokenFileOpt,
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to finish (exit 1 unless it is done)."),
    as_json: bool = JsonOpt,
) -> None:
    """Submit a job and print its id. Any `potstill generate` flag may follow (--top-k 8, --mode generate, ...)."""
    spec: dict[str, Any] = {}
    if config:
        given = by_field_name(GenerateConfig, GenerateConfig.from_file(config), f"config file {config}", GenerateError)
        spec.update({k: v for k, v in given.items() if k not in NOT_SENT})
    spec.update(parse_generate_flags(list(ctx.args)))
    out = pick("--out", out, "--store", store)
    if prompts:
        spec["prompts"] = prompts
    if out:
        spec["store"] = out
    for name, flag in (("prompts", "--prompts"), ("store", "--out")):
        if not spec.get(name):
            raise ServiceError(f"{flag} is required")
        spec[name] = _absolute(str(spec[name]))
    with _client(server, token_file) as client:
        status = client.submit(spec)
        if not wait:
            typer.echo(json.dumps(status, indent=2) if as_json else status["id"])
            return
        if not as_json:
            typer.echo(status["id"])
        final = client.wait(status["id"])
    _print_status(final, as_json)
    _fail_unless_done(final)


@app.command("status")
def status(
    job_id: str = typer.Argument(..., help="Job id."),
    server: str = ServerOpt,
    token_file: str = TokenFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a job: state, records and tokens done, ETA, errors."""
    with _client(server, token_file) as client:
        _print_status(client.status(job_id), as_json)


@app.command("list")
def list_jobs(
    state: str = typer.Option(None, help="Only jobs in this state (queued, running, done, failed, cancelled).  [default: all]"),
    limit: int = typer.Option(None, help="Only the newest N jobs.  [default: all]"),
    server: str = ServerOpt,
    token_file: str = TokenFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List the service's jobs, oldest first."""
    with _client(server, token_file) as client:
        jobs = client.list(state, limit)
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    for job in jobs:
        total = job["records_total"] if job["records_total"] is not None else "?"
        typer.echo(f"{job['id']}  {job['state']:<9}  {job['records_done']}/{total} records  {job['store']}")


@app.command("cancel")
def cancel(
    job_id: str = typer.Argument(..., help="Job id."),
    server: str = ServerOpt,
    token_file: str = TokenFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Cancel a job: a queued one at once, a running one after its current batch (committed records stay)."""
    with _client(server, token_file) as client:
        _print_status(client.cancel(job_id), as_json)


@app.command("wait")
def wait_for(
    job_id: str = typer.Argument(..., help="Job id."),
    timeout: float = typer.Option(None, help="Give up after this many seconds (exit 1).  [default: never]"),
    poll: float = typer.Option(2.0, help="Seconds between status calls."),
    server: str = ServerOpt,
    token_file: str = TokenFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Wait until a job finishes; exit 0 when it is done, 1 when it failed or was cancelled."""
    with _client(server, token_file) as client:
        final = client.wait(job_id, poll_s=poll, timeout_s=timeout)
    _print_status(final, as_json)
    _fail_unless_done(final)
