"""`potstill jobs`: submit generation jobs to a `potstill serve` and follow them.

    potstill jobs submit --server URL --prompts P --out STORE [any potstill generate flag]   # prints the id
    potstill jobs status ID [--json]      potstill jobs list      potstill jobs cancel ID      potstill jobs wait ID

The server is --server or $POTSTILL_SERVER; the bearer token $POTSTILL_TOKEN or --token-file.
Each command's own settings are a dataclass below (`JobsConfig` and its extensions); the generate flags
that follow `jobs submit` are read from `GenerateConfig`'s settings (--top-k 8, --hidden-layers 4,8,-1,
--no-append-eos, old spellings too), so every `potstill generate` setting works here without a list to
keep in sync.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import typer

from potstill.cli.options import APP_SETTINGS
from potstill.settings import (
    by_field_name,
    check_settings,
    cli_type,
    fields_of,
    flag_of,
    info_of,
    load_settings,
    note,
    same_as,
    setting,
    settings_options,
)
from potstill.teacher_gen.config import GenerateConfig, coerce_setting
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.service.jobqueue import STATES
from potstill.teacher_gen.service.settings import (
    DEFAULT_SERVER,
    SERVER_ENV,
    ServeConfig,
    ServiceError,
    read_token,
)

app = typer.Typer(help="Submit generation jobs to a `potstill serve` and follow them.", **APP_SETTINGS)

JsonOpt = typer.Option(False, "--json", help="Print JSON.")
# Settings the service decides: a client cannot send them.
NOT_SENT = ("progress",)


@dataclass
class JobsConfig:
    """Where the service is: the settings of `potstill jobs status` and `cancel`, and of every jobs command."""

    server: str = setting(DEFAULT_SERVER, env=SERVER_ENV, shown_default=f"${SERVER_ENV}, else {DEFAULT_SERVER}",
                          help="URL of the potstill service.")
    token_file: str | None = same_as(ServeConfig, "token_file")

    def validate(self) -> JobsConfig:
        check_settings(self, ServiceError)
        return self

    def client(self) -> Any:
        from potstill.teacher_gen.service.client import ServiceClient

        return ServiceClient(self.server, read_token(self.token_file))


@dataclass
class SubmitConfig(JobsConfig):
    """`potstill jobs submit`'s own settings (the job's generate settings follow as generate flags)."""

    prompts: str = setting("", required=True,
                           help="Prompt set on the server (path or URL); a relative path is made absolute.")
    out: str = setting("", required=True, aliases=("--store",), help="Store the job writes on the server, path or URL.")
    wait: bool = setting(False, help="Wait for the job to finish (exit 1 unless it is done).")


@dataclass
class ListConfig(JobsConfig):
    """`potstill jobs list`'s settings."""

    state: str | None = setting(None, choices=lambda: STATES, shown_default="all", help="Only jobs in this state.")
    limit: int | None = setting(None, shown_default="all", help="Only the newest N jobs.")

    def validate(self) -> ListConfig:
        super().validate()
        if self.limit is not None and self.limit < 1:
            raise ServiceError(f"--limit must be at least 1, got {self.limit}")
        return self


@dataclass
class WaitConfig(JobsConfig):
    """`potstill jobs wait`'s settings."""

    timeout: float | None = setting(None, shown_default="never", help="Give up after this many seconds (exit 1).")
    poll: float = setting(2.0, help="Seconds between status calls.")


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="jobs")


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
@settings_options(SubmitConfig)
def submit(
    config: str = typer.Option(None, "--config", help="YAML, TOML or JSON file of generate settings (flags override it)."),
    as_json: bool = JsonOpt,
    *,
    ctx: typer.Context,
    flags: dict[str, Any],
) -> None:
    """Submit a job and print its id. Any `potstill generate` flag may follow (--top-k 8, --mode generate, ...)."""
    spec: dict[str, Any] = {}
    if config:
        given = by_field_name(GenerateConfig, GenerateConfig.from_file(config), f"config file {config}", GenerateError)
        spec.update({k: v for k, v in given.items() if k not in NOT_SENT})
    spec.update(parse_generate_flags(list(ctx.args)))
    # the prompts and store may come from the file or the generate flags; this command's flags win
    typed = {k: v for k, v in flags.items() if v is not None}
    cfg = load_settings(SubmitConfig, None, {"prompts": spec.get("prompts"), "out": spec.get("store"), **typed},
                        error=ServiceError)
    spec["prompts"], spec["store"] = _absolute(cfg.prompts), _absolute(cfg.out)
    with cfg.client() as client:
        status = client.submit(spec)
        if not cfg.wait:
            typer.echo(json.dumps(status, indent=2) if as_json else status["id"])
            return
        if not as_json:
            typer.echo(status["id"])
        final = client.wait(status["id"])
    _print_status(final, as_json)
    _fail_unless_done(final)


@app.command("status")
@settings_options(JobsConfig)
def status(
    job_id: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    *,
    flags: dict[str, Any],
) -> None:
    """Show a job: state, records and tokens done, ETA, errors."""
    with load_settings(JobsConfig, None, flags, error=ServiceError).client() as client:
        _print_status(client.status(job_id), as_json)


@app.command("list")
@settings_options(ListConfig)
def list_jobs(as_json: bool = JsonOpt, *, flags: dict[str, Any]) -> None:
    """List the service's jobs, oldest first."""
    cfg = load_settings(ListConfig, None, flags, error=ServiceError)
    with cfg.client() as client:
        jobs = client.list(cfg.state, cfg.limit)
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    for job in jobs:
        total = job["records_total"] if job["records_total"] is not None else "?"
        typer.echo(f"{job['id']}  {job['state']:<9}  {job['records_done']}/{total} records  {job['store']}")


@app.command("cancel")
@settings_options(JobsConfig)
def cancel(
    job_id: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    *,
    flags: dict[str, Any],
) -> None:
    """Cancel a job: a queued one at once, a running one after its current batch (committed records stay)."""
    with load_settings(JobsConfig, None, flags, error=ServiceError).client() as client:
        _print_status(client.cancel(job_id), as_json)


@app.command("wait")
@settings_options(WaitConfig)
def wait_for(
    job_id: str = typer.Argument(..., help="Job id."),
    as_json: bool = JsonOpt,
    *,
    flags: dict[str, Any],
) -> None:
    """Wait until a job finishes; exit 0 when it is done, 1 when it failed or was cancelled."""
    cfg = load_settings(WaitConfig, None, flags, error=ServiceError)
    with cfg.client() as client:
        final = client.wait(job_id, poll_s=cfg.poll, timeout_s=cfg.timeout)
    _print_status(final, as_json)
    _fail_unless_done(final)
