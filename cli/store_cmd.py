"""`potstill store info | verify | copy | export | report`."""

from __future__ import annotations

import json

import typer

from potstill.cli.options import APP_SETTINGS
from potstill.share import ReportConfig, export_store, format_info, store_info, write_report
from potstill.store import Store, copy_store, open_store, verify_store
from potstill.store.verify import report_json

app = typer.Typer(help="Inspect, check, copy, export and report on a store.", **APP_SETTINGS)


@app.command("info")
def info(
    store: str = typer.Argument(..., help="Store path or URL (s3://, gs://, file://, memory://)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with a top-level `records` count)."),
) -> None:
    """What a store holds: teacher, tokenizer, K, layers, shards, records, tokens, bytes by field.

    Reads the manifest, the commit records and a rationale store's answers (no hashing): exit 1 when a commit record is
    damaged or ids repeat, with the problems listed; `verify` checks every byte."""
    data = store_info(Store(store, strict=False))
    typer.echo(json.dumps(data, indent=2) if as_json else format_info(data))
    if data["problems"]:  # damaged commit records or duplicate ids: the store does not verify
        raise typer.Exit(1)


@app.command("verify")
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    clean: bool = typer.Option(False, "--clean", help="Remove what crashed writers left: uncommitted shards, "
                               "temporary files, stale leases (never what a commit record names)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Recompute every checksum and check schema and counts; exit 1 naming each bad shard."""
    report = verify_store(store, clean=clean)
    if as_json:
        typer.echo(report_json(report))
    else:
        for problem in report.problems:
            typer.echo(f"BAD   {problem}", err=True)
        for left in report.leftovers:
            state = "in progress" if left.live else ("removed" if left.path in report.cleaned else "leftover")
            hint = "" if left.live or left.path in report.cleaned else " (remove with --clean)"
            typer.echo(f"{state:<11} {left.path}: {left.kind}; {left.reason}{hint}")
        verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
        typer.echo(f"{verdict}: {report.shards} shards, {report.records} records, {report.tokens} tokens checked")
    if not report.ok:
        raise typer.Exit(1)


@app.command("copy")
def copy(
    source: str = typer.Argument(..., help="Store path or URL to copy from."),
    destination: str = typer.Argument(..., help="Store path or URL to copy to (created if missing)."),
) -> None:
    """Copy the committed shards to another place (e.g. s3://), checking every sha256; reruns resume."""

    def progress(shard: str, done: int, total: int) -> None:
        typer.echo(f"  [{done}/{total}] {shard}", err=True)

    report = copy_store(source, destination, progress=progress)
    skipped = f", {len(report.shards_skipped)} already there" if report.shards_skipped else ""
    repaired = f", {len(report.shards_repaired)} repaired (their commit record there differed)" if report.shards_repaired else ""
    cleaned = f"; removed {len(report.cleaned)} leftover(s) of interrupted runs there" if report.cleaned else ""
    typer.echo(f"copied {len(report.shards_copied)} shards ({report.records} records, {report.bytes:,} bytes) "
               f"to {destination}{skipped}{repaired}{cleaned}")


@app.command("export")
def export(
    store: str = typer.Argument(..., help="Store path or URL."),
    to: str = typer.Option(..., "--to", help="Output FILE.parquet or FILE.jsonl."),
    with_targets: bool = typer.Option(False, "--with-targets", help="Parquet: add the teacher's targets per scored "
                                      "position (top-K ids, log-probs, log tail, token log-prob; sampled ids and counts)."),
) -> None:
    """One row per record (id, text and token fields) as Parquet or JSONL; each id once.

    Without --with-targets the file holds no teacher targets; hidden states are never exported."""
    opened = open_store(store, verify_reads=with_targets)
    count = export_store(opened, to, with_targets=with_targets)
    skipped = f" ({opened.num_duplicates} duplicate rows of earlier-committed ids left out)" if opened.num_duplicates else ""
    typer.echo(f"wrote {count} records to {to}{skipped}")


@app.command("report")
def report(
    store: str = typer.Argument(..., help="Store path or URL."),
    out: str = typer.Option("report.html", "--out", help="The HTML file to write (self-contained: plots inline)."),
    max_records: int = typer.Option(ReportConfig.max_records, "--max-records",
                                    help="Records read for the statistics; a bigger store is sampled at random (seeded)."),
    examples: int = typer.Option(ReportConfig.examples, "--examples", help="Example records shown (rationales when the store has them)."),
    reference_field: str = typer.Option(ReportConfig.reference_field, "--reference-field",
                                        help="Key of a record's meta holding a reference answer (a field of the prompt file)."),
    seed: int = typer.Option(ReportConfig.seed, "--seed", help="Seed of the record sample."),
) -> None:
    """An HTML page of what the store holds: teacher, targets, plots of entropy, top-1, tail mass, lengths,
    sampled ids, hidden-state norms, answers and examples; every file read is checked first."""
    stats = write_report(store, out, ReportConfig(max_records=max_records, examples=examples,
                                                  reference_field=reference_field, seed=seed))
    scope = f"a sample of {stats.records_read} of {stats.records_total}" if stats.sampled else f"{stats.records_read}"
    typer.echo(f"wrote {out} ({scope} records)")
