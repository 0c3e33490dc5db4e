"""`potstill store info | verify | copy | export | report | publish`.

The settings of verify and export are the dataclasses here (the store package sits below the
settings machinery, so their options live with the commands); report's are `ReportConfig`
(potstill/share/report.py). info and copy take no settings: a store path, and info's --json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import typer

from potstill.cli.options import APP_SETTINGS
from potstill.settings import check_settings, load_settings, setting, settings_options
from potstill.share import ReportConfig, export_store, format_info, store_info, write_report
from potstill.share.publish import check_repo_id, publish_store, push_folder
from potstill.store import Store, copy_store, open_store, verify_store
from potstill.store.errors import StoreError
from potstill.store.provenance import JobStatus
from potstill.store.published import PUBLISHED_FILE, is_published
from potstill.store.verify import MAX_JOBS, report_json

app = typer.Typer(help="Inspect, check, copy, export and report on a store.", **APP_SETTINGS)


@dataclass
class VerifyConfig:
    """Settings of `potstill store verify`."""

    clean: bool = setting(False, help="Remove what crashed writers left: uncommitted shards, temporary files, "
                          "stale leases (never what a commit record names).")
    jobs: int = setting(0, help=f"Shards checked at once (threads); 0: one per core available, at most {MAX_JOBS}. "
                        "The report is the same for any number.")
    quick: bool = setting(False, help="Check only the commit records, the manifest and each file's presence and "
                          "size: no checksum is computed and no value read.")
    complete: bool = setting(False, help="Also fail while the job is incomplete: records of the latest run's prompt "
                             "set missing, a --workers share that never ran or is behind (one line each), or no "
                             "run records to tell.")

    def validate(self) -> VerifyConfig:
        check_settings(self, StoreError)
        if self.jobs < 0:
            raise StoreError(f"--jobs must be 0 (one per core) or more, got {self.jobs}")
        return self


@dataclass
class ExportConfig:
    """Settings of `potstill store export`."""

    to: str = setting("", required=True, help="Output FILE.parquet or FILE.jsonl.")
    with_targets: bool = setting(False, help="Parquet: add the teacher's targets per scored position (top-K ids, "
                                 "log-probs, log tail, token log-prob; sampled ids and counts).")

    def validate(self) -> ExportConfig:
        check_settings(self, StoreError)
        return self


def refuse_published(url: str) -> None:
    """A published folder holds the store's manifest but none of its shards: no store command reads it
    (it would find an empty store)."""
    if not url.startswith("hf://") and "://" not in url and not os.path.isfile(os.path.join(url, PUBLISHED_FILE)):
        return  # a local store: told apart without asking a file system
    if is_published(url):
        raise StoreError(f"{url} is a published dataset folder (`potstill store publish`), not a store: read it with "
                         "`datasets`, train from it with `potstill train --store`")


@app.command("info")
def info(
    store: str = typer.Argument(..., help="Store path or URL (s3://, gs://, file://, memory://)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with a top-level `records` count)."),
) -> None:
    """What a store holds: teacher, tokenizer, K, layers, shards, records, tokens, bytes by field.

    Reads the manifest, the commit records and a rationale store's answers (no hashing): exit 1 when a commit record is
    damaged or ids repeat, with the problems listed; `verify` checks every byte."""
    refuse_published(store)
    data = store_info(Store(store, strict=False))
    typer.echo(json.dumps(data, indent=2) if as_json else format_info(data))
    if data["problems"]:  # damaged commit records or duplicate ids: the store does not verify
        raise typer.Exit(1)


@app.command("verify")
@settings_options(VerifyConfig)
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    *,
    flags: dict[str, Any],
) -> None:
    """Recompute every checksum and check schema and counts; exit 1 naming each bad shard."""
    cfg = load_settings(VerifyConfig, None, flags, error=StoreError)
    refuse_published(store)
    report = verify_store(store, clean=cfg.clean, jobs=cfg.jobs or None, quick=cfg.quick)
    if as_json:
        typer.echo(report_json(report))
    else:
        for problem in report.problems:
            typer.echo(f"BAD   {problem}", err=True)
        for left in report.leftovers:
            state = "in progress" if left.live else ("removed" if left.path in report.cleaned else "leftover")
            hint = "" if left.live or left.path in report.cleaned else " (remove with --clean)"
            typer.echo(f"{state:<11} {left.path}: {left.kind}; {left.reason}{hint}")
        for warning in report.run_warnings:
            typer.echo(f"warning     {warning}", err=True)
        verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
        how = "" if report.hashed else " (quick: commit records and file sizes only; no checksum computed, no value read)"
        typer.echo(f"{verdict}: {report.shards} shards, {report.records} records, {report.tokens} tokens checked{how}")
        for line in job_lines(report.job, cfg.complete):  # after the verdict, which scripts read first
            typer.echo(line)
    if not report.ok or (cfg.complete and (report.job is None or not report.job.complete)):
        raise typer.Exit(1)


def job_lines(job: JobStatus | None, complete: bool) -> list[str]:
    """How complete the job is, for verify: `N of M records committed`, a MISSING line per share that never
    ran or is behind; without run records, a line only when --complete asks."""
    if job is None:
        return ["MISSING     no run records: this store does not say what its job is (written before potstill "
                "recorded runs), so it cannot be shown complete"] if complete else []
    first, *shares = job.lines()
    return [f"job         {first}", *(f"MISSING     {line}" for line in shares)]


@app.command("copy")
def copy(
    source: str = typer.Argument(..., help="Store path or URL to copy from."),
    destination: str = typer.Argument(..., help="Store path or URL to copy to (created if missing)."),
) -> None:
    """Copy the committed shards to another place (e.g. s3://), checking every sha256; reruns resume."""

    def progress(shard: str, done: int, total: int) -> None:
        typer.echo(f"  [{done}/{total}] {shard}", err=True)

    refuse_published(source)
    report = copy_store(source, destination, progress=progress)
    skipped = f", {len(report.shards_skipped)} already there" if report.shards_skipped else ""
    repaired = f", {len(report.shards_repaired)} repaired (their commit record there differed)" if report.shards_repaired else ""
    cleaned = f"; removed {len(report.cleaned)} leftover(s) of interrupted runs there" if report.cleaned else ""
    typer.echo(f"copied {len(report.shards_copied)} shards ({report.records} records, {report.bytes:,} bytes) "
               f"to {destination}{skipped}{repaired}{cleaned}")


@app.command("export")
@settings_options(ExportConfig)
def export(store: str = typer.Argument(..., help="Store path or URL."), *, flags: dict[str, Any]) -> None:
    """One row per record (id, text and token fields) as Parquet or JSONL; each id once.

    Without --with-targets the file holds no teacher targets; hidden states are never exported."""
    cfg = load_settings(ExportConfig, None, flags, error=StoreError)
    refuse_published(store)
    opened = open_store(store, verify_reads=cfg.with_targets)
    count = export_store(opened, cfg.to, with_targets=cfg.with_targets)
    skipped = f" ({opened.num_duplicates} duplicate rows of earlier-committed ids left out)" if opened.num_duplicates else ""
    typer.echo(f"wrote {count} records to {cfg.to}{skipped}")


@dataclass
class PublishConfig:
    """Settings of `potstill store publish`."""

    license: str = setting("", shown_default="the store's provenance licence", help="The dataset's licence for its card, a Hub licence id such as apache-2.0 or "
                           "cc-by-4.0; default: the licence the store's provenance records. A store with neither "
                           "is refused.")
    push: str = setting("", shown_default="no upload", help="Then upload the folder to this Hub dataset repository, OWNER/NAME (created "
                        "private if missing), through huggingface_hub: needs `hf auth login`; a rerun resumes.")

    def validate(self) -> PublishConfig:
        check_settings(self, StoreError)
        if self.push:
            check_repo_id(self.push)
        return self


@app.command("publish")
@settings_options(PublishConfig)
def publish(
    store: str = typer.Argument(..., help="Store path or URL."),
    out: str = typer.Argument(..., help="Folder to write (new or empty): a Hugging Face Hub dataset repository."),
    *,
    flags: dict[str, Any],
) -> None:
    """A folder laid out as a Hub dataset: Parquet records with their targets decoded into plain columns,
    hidden states as a second config, the manifest, the tokenizer and a README.md dataset card.

    Read with `datasets.load_dataset(FOLDER)` without potstill, upload with `hf upload OWNER/NAME FOLDER
    --repo-type dataset` (or --push), train from it with `potstill train --store FOLDER`."""
    cfg = load_settings(PublishConfig, None, flags, error=StoreError)
    refuse_published(store)
    index = publish_store(open_store(store, verify_reads=True), out, license=cfg.license or None,
                          repo_id=cfg.push or None)
    records = sum(s["records"] for s in index["shards"])
    size = sum(f["bytes"] for f in index["files"].values())
    typer.echo(f"wrote {out}: {records} records in {len(index['shards'])} Parquet files, {size:,} bytes, "
               f"licence {index['license']}")
    if cfg.push:
        typer.echo(f"uploaded to {push_folder(out, cfg.push)}")


@app.command("report")
@settings_options(ReportConfig)
def report(store: list[str] = typer.Argument(..., help="Store path or URL; several: teachers' stores over the same "
                                             "prompts, compared on the first's records."),
           *, flags: dict[str, Any]) -> None:
    """An HTML page of what the store holds: teacher, targets, plots of entropy, top-1, tail mass, lengths,
    sampled ids, hidden-state norms, answers and examples; every file read is checked first.

    Several stores (the teachers of `potstill train --store A --store B`): the first's page with a Teachers
    section, each teacher's targets and how often the teachers agree, e.g. `potstill store report add.store
    sub.store --out teachers.html`."""
    cfg = load_settings(ReportConfig, None, flags, error=StoreError)
    for url in store:
        refuse_published(url)
    stats = write_report(store if len(store) > 1 else store[0], config=cfg)
    scope = f"a sample of {stats.records_read} of {stats.records_total}" if stats.sampled else f"{stats.records_read}"
    typer.echo(f"wrote {cfg.out} ({scope} records)")
