"""Reliability: the fault campaigns of tests/test_faults.py at a larger scale, and damaged stores and
hostile prompt files, with a table of what was injected and what survived.

kills     `kill -9` of `potstill generate` (HF backend, tiny random teacher, hidden layers, two-record
          shards, two writer threads), `potstill store copy` (a store of many one-record shards with
          hidden states) and `potstill train` (hidden-state loss, one loader worker, frequent
          checkpoints), each at kill points inside the process (mid-shard, between a commit record's
          temporary file and its link, mid-checkpoint, ...) and from outside (seeded delays, the N-th
          new commit record or a checkpoint appearing). Each kill is followed by a rerun of the same
          command, each campaign by an uninterrupted run compared with an uninterrupted reference:
          a kill survived when every committed record was the reference's, once, the store verified,
          and the campaign ended identical to the reference with nothing left behind. Also from
          outside: `store export` (the file absent or whole after each kill, the rerun's equal to an
          uninterrupted export's) and `potstill serve` mid-job (bench/servefaults.py: restarted on its
          state, the job finishes once, one attempt per kill, its store the reference's),
          `generate --executor ray` (bench/rayfaults.py: its driver killed at a seeded delay after its
          first commit, then the rerun's actor killed mid-block, Ray restarting it: every record the
          local executor's, once, nothing left behind), and, where vllm is installed,
          `generate --backend vllm` (`vllm`: its kill points and from outside).
disk      bench/diskfaults.py: `generate`, `store copy` and `store export` under a full disk
          (`RLIMIT_FSIZE`, seeded sizes: while the store is created and mid-shard) or with the store's
          shards/ or commits/ folder made read-only after a seeded number of commits; each run fails
          in one line, keeps what it committed whole, and a rerun with room back completes exactly.
s3        bench/s3faults.py: `generate` and `store copy` to s3:// (moto's server) through a seeded
          fault proxy (500, 503 SlowDown, held past the read timeout, connections dropped before or
          after S3 applied the request), then a clean rerun: nothing lost, doubled or altered.
          Injected counts the faulty answers that reached the client (most are retried unseen).
flips     Flipped bytes in every kind of store file (manifest, tokenizer, commit record, Arrow file,
          Zarr metadata, hidden-state data file), and commit records truncated, emptied or listing a
          wrong checksum, and a shard file deleted: `potstill store verify` must exit 1 naming the
          damaged file or shard and nothing else, `verify --clean` must remove nothing, and
          `generate` and `train` must refuse (or, with --skip-bad-shards, skip and name) the shard.
clash     Two `potstill generate` runs of the same prompts into one new store with the same
          --writer-id, the second a seeded 0-3 s after the first: the store must end with every
          record of the reference once, byte for byte, and verify (either run may refuse).
bytes     bench/bytedamage.py: files of every kind flipped, zeroed, cut short and extended at seeded
          offsets in each third, and deleted, checked in-process: `store verify` names the file or
          its shard and nothing else, `--clean` removes nothing, the loader's checked read refuses.
prompts   Hostile prompt lines: each bad one skipped with its line number and reason, never a
          traceback; the odd but valid ones written exactly as given; every good record written.

Every trial draws its randomness from (--seed, campaign, trial number) and failures name their
trial, so one reruns alone: `--only bytes --trial 17 --seed 2026`.

    python bench/reliability.py                    # the full run, about an hour on 2 busy cores
    python bench/reliability.py --quick            # a smoke run, a few minutes
    python bench/reliability.py --only flips,prompts --json reliability.json
    .venv-vllm/bin/python bench/reliability.py --only vllm    # (a Python where vllm is installed)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import bytedamage
import diskfaults
from common import HOSTILE_LINES, build_llama, build_student, build_tokenizer, prompt_rows, write_jsonl
from faultcampaigns import (
    COPY_POINTS,
    ENV,
    GENERATE_POINTS,
    REPO,
    TRAIN_POINTS,
    VLLM_GENERATE_POINTS,
    Campaign,
    TrainSetup,
    build_copy_source,
    canonical,
    copy_campaign,
    export_campaign,
    files_under,
    generate_args,
    generate_campaign,
    run_potstill,
    store_contents,
    train_campaign,
    verify_problems,
)
from faults import flip_bytes, rewrite_column


@dataclass
class Row:
    fault: str
    injected: int
    survived: int
    lost: int = 0  # records (for train: logged steps) lost
    doubled: int = 0  # records stored twice
    altered: int = 0  # records whose bytes differ from the reference run's
    failures: list[str] = field(default_factory=list)  # what went wrong, first few


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- kill campaigns --------------------------------------------------------------------------------
def kind_rounds(kinds: list[str], per_round: int, first: tuple[str, ...] = (),
                last: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Rounds of `per_round` kill kinds, cycling through `kinds`; every other round starts with
    `first` (the store's creation), every round ends with `last` (a kill after which nothing is left)."""
    cycle = itertools.cycle(kinds)
    for number in itertools.count():
        head = list(first) if number % 2 == 0 else []
        yield head + [next(cycle) for _ in range(per_round - len(head) - len(last))] + list(last)


def campaign_row(fault: str, campaigns: list[Campaign], note: str = "") -> Row:
    landed = [o for c in campaigns for o in c.outcomes if o.killed]
    inside = sum(1 for o in landed if o.trigger is not None and o.trigger.point)
    fault += f" ({inside} at kill points, {len(landed) - inside} from outside{'; ' + note if note else ''})"
    violations = [f"{c.name}: {v}" for c in campaigns for v in c.violations]
    altered = sum(1 for v in violations if "differs from the" in v)
    return Row(fault, len(landed), sum(c.survived for c in campaigns),
               sum(c.lost for c in campaigns), sum(c.doubled for c in campaigns), altered, violations[:5])


def until_landed(kills: int, kinds: Iterator[list[str]], run: Callable[[int, list[str]], Campaign],
                 only_round: int | None = None) -> list[Campaign]:
    """Campaigns, one a round, until `kills` kills have landed (a kill whose run ended first, with
    nothing left to do, does not count); or round `only_round` alone (the same kills, the same seed).
    Round N runs with a seed drawn from (--seed, campaign, N) (`round_seed`), so any round reruns alone."""
    campaigns: list[Campaign] = []
    for number, round_kinds in enumerate(kinds):
        landed = sum(c.landed for c in campaigns)
        if only_round is not None:
            if number == only_round:
                say(f"round {number}: {', '.join(round_kinds)}")
                return [_named(run(number, round_kinds), number)]
            continue
        if landed >= kills:
            break
        say(f"round {number}: {', '.join(round_kinds[: kills - landed])}")
        campaigns.append(_named(run(number, round_kinds[: kills - landed]), number))
    return campaigns


def round_seed(seed: int, campaign: str, number: int) -> int:
    """The seed of round `number` of a kill campaign, as every other trial's: from (seed, campaign, index)."""
    return bytedamage.trial_rng(seed, campaign, number).randrange(1 << 31)


def _named(campaign: Campaign, number: int) -> Campaign:
    """The campaign names its round, and so each violation reported (`--trial N` reruns it)."""
    campaign.name = f"{campaign.name} round {number}"
    return campaign


def kill_generate(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    workdir = os.path.join(ctx["work"], "kill-generate")
    os.makedirs(workdir)
    reference = None

    def one(number: int, kinds: list[str]) -> Campaign:
        nonlocal reference
        campaign, reference = generate_campaign(ctx["teacher"], ctx["prompts"], workdir, kinds,
                                                round_seed(seed, "kill-generate", number), reference, log=say)
        return campaign

    campaigns = until_landed(kills, kind_rounds(["delay", "commits", *GENERATE_POINTS], 6, first=("manifest",)), one,
                             only_round)
    return campaign_row("kill -9 of `potstill generate`", campaigns)


def kill_generate_vllm(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    """The generate campaign with `--backend vllm` (run with a Python where vllm is installed): the
    store's kill points (not the hidden-state chunk: vLLM captures none) and kills from outside, which
    land in the engine's start-up too. Each run starts the engine afresh (tens of seconds)."""
    from transformers import AutoTokenizer

    workdir = os.path.join(ctx["work"], "kill-generate-vllm")
    os.makedirs(workdir)
    # (attention heads of width 32: the smallest vLLM's CPU attention runs)
    teacher = os.path.join(workdir, "teacher")
    build_llama(teacher, len(AutoTokenizer.from_pretrained(ctx["tokenizer"])), hidden=64, layers=2, heads=2, seed=1,
                tokenizer_dir=ctx["tokenizer"])
    reference = None

    def one(number: int, kinds: list[str]) -> Campaign:
        nonlocal reference
        campaign, reference = generate_campaign(teacher, ctx["prompts"], workdir, kinds,
                                                round_seed(seed, "kill-generate-vllm", number), reference, log=say,
                                                backend="vllm")
        return campaign

    campaigns = until_landed(kills, kind_rounds(["delay", "commits", *VLLM_GENERATE_POINTS], 5, first=("manifest",)),
                             one, only_round)
    return campaign_row("kill -9 of `potstill generate --backend vllm`", campaigns)


def kill_copy(ctx: dict[str, Any], kills: int, seed: int, shards: int, only_round: int | None = None) -> Row:
    workdir = os.path.join(ctx["work"], "kill-copy")
    os.makedirs(workdir)
    source = os.path.join(workdir, "source.store")
    build_copy_source(source, shards, seed)
    campaigns = until_landed(kills, kind_rounds(["delay", "commits", *COPY_POINTS], 10, first=("manifest",)),
                             lambda number, kinds: copy_campaign(source, workdir, kinds,
                                                                 round_seed(seed, "kill-copy", number), log=say),
                             only_round)
    return campaign_row(f"kill -9 of `potstill store copy`, {shards} shards", campaigns)


def kill_train(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    workdir = os.path.join(ctx["work"], "kill-train")
    os.makedirs(workdir)
    setup = TrainSetup(ctx["train_store"], ctx["student"], max_steps=24, save_steps=3, save_total_limit=2)
    reference = None

    def one(number: int, kinds: list[str]) -> Campaign:
        nonlocal reference
        campaign, reference = train_campaign(setup, workdir, kinds, round_seed(seed, "kill-train", number),
                                             reference, log=say)
        return campaign

    campaigns = until_landed(kills, kind_rounds(["checkpoint", "delay", *(p for p in TRAIN_POINTS if p != "final-save")], 5,
                                               last=("final-save",)), one, only_round)
    return campaign_row("kill -9 of `potstill train`", campaigns, note="lost = logged steps")


def kill_export(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    workdir = os.path.join(ctx["work"], "kill-export")
    os.makedirs(workdir)
    reference = None

    def one(number: int, kinds: list[str]) -> Campaign:
        nonlocal reference
        campaign, reference = export_campaign(ctx["train_store"], workdir, len(kinds),
                                              round_seed(seed, "kill-export", number), reference, log=say)
        return campaign

    campaigns = until_landed(kills, kind_rounds(["outside"], 4), one, only_round)
    return campaign_row("kill -9 of `potstill store export` to Parquet", campaigns)


def kill_serve(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    """bench/servefaults.py: rounds of up to 3 kills of the service mid-job, each with its own job."""
    import servefaults

    workdir = os.path.join(ctx["work"], "kill-serve")
    os.makedirs(workdir)
    # (a job of 96 prompts, inside the service's data root: long enough for three kills to land)
    prompts = write_jsonl(os.path.join(workdir, "prompts.jsonl"), prompt_rows(96, seed=seed))
    made = run_potstill(generate_args(ctx["teacher"], prompts, os.path.join(workdir, "reference.store")))
    if made.returncode != 0:
        raise SystemExit(f"could not generate the serve reference: {made.tail()}")
    _, reference = store_contents(os.path.join(workdir, "reference.store"))
    rounds: list[servefaults.ServeRound] = []
    for number in itertools.count() if only_round is None else [only_round]:
        landed = sum(len(r.kills) for r in rounds)
        if only_round is None and landed >= kills:
            break
        rng = bytedamage.trial_rng(seed, "kill-serve", number)
        rounds.append(servefaults.serve_round(ctx["teacher"], prompts, workdir, reference, min(3, kills - landed)
                                              if only_round is None else 3, rng, f"round-{number}", log=say))
        say(f"serve round {number}: {len(rounds[-1].kills)} kills, {rounds[-1].violations[:3] or 'ok'}")
    failures = [f"{r.name}: {v}" for r in rounds for v in r.violations]
    return Row("kill -9 of `potstill serve` mid-job, restarted: the job done once (0 at kill points, "
               f"{sum(len(r.kills) for r in rounds)} from outside)", sum(len(r.kills) for r in rounds),
               sum(r.survived for r in rounds), sum(r.lost for r in rounds), sum(r.doubled for r in rounds),
               sum(r.altered for r in rounds), failures[:5])


def kill_ray(ctx: dict[str, Any], kills: int, seed: int, only_round: int | None = None) -> Row:
    """bench/rayfaults.py: rounds of a driver kill and an actor kill of `generate --executor ray`."""
    import ray
    import rayfaults

    workdir = os.path.join(ctx["work"], "kill-ray")
    os.makedirs(workdir)
    reference_store = os.path.join(workdir, "reference.store")
    made = run_potstill(generate_args(ctx["teacher"], ctx["prompts"], reference_store))  # the local executor
    if made.returncode != 0:
        raise SystemExit(f"could not generate the Ray reference: {made.tail()}")
    _, reference = store_contents(reference_store)
    ray.init(num_cpus=6, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    try:
        address = ray.get_runtime_context().gcs_address
        campaigns = until_landed(kills, kind_rounds(["driver", "actor"], 2),
                                 lambda number, kinds: rayfaults.ray_round(
                                     ctx["teacher"], ctx["prompts"], workdir, reference, address,
                                     bytedamage.trial_rng(seed, "kill-ray", number), f"round-{number}", log=say),
                                 only_round)
    finally:
        ray.shutdown()
    return campaign_row("kill -9 of `potstill generate --executor ray`: its driver, and an actor mid-block",
                        campaigns)


# -- disk faults -----------------------------------------------------------------------------------
def disk_faults(ctx: dict[str, Any], trials: int, seed: int, only_trial: int | None = None) -> list[Row]:
    """bench/diskfaults.py: each trial two seeded faults, then a rerun with room and permissions back."""
    from potstill.store import open_store

    _, reference = store_contents(ctx["train_store"])
    store, dest = os.path.join(ctx["work"], "disk.store"), os.path.join(ctx["work"], "disk-copy.store")
    shards = len(open_store(ctx["train_store"]).commits)
    to = os.path.join(ctx["work"], "disk-export.parquet")
    made = run_potstill(["store", "export", ctx["train_store"], "--to", to])
    if made.returncode != 0:
        raise SystemExit(f"could not export the store: {made.tail()}")
    with open(to, "rb") as f:
        exported = f.read()
    # (shards of 12 records: their hidden-state files outgrow the tokenizer's 14 KB, so that a limit
    # above it lands mid-shard, one below it while the store is created)
    big_shards = [*generate_args(ctx["teacher"], ctx["prompts"], store), "--shard-records", "12"]
    small_shards = generate_args(ctx["teacher"], ctx["prompts"], store)
    plans: list[tuple[str, Callable[[random.Random, int], diskfaults.DiskTrial]]] = [
        ("full disk (`RLIMIT_FSIZE` 1–22 KB) under `generate`, then a rerun", lambda rng, n: diskfaults.generate_trial(
            big_shards, store, reference, [diskfaults.draw_fault(rng, ("fsize",), 1_000, 22_000, 0) for _ in range(2)],
            f"trial {n}")),
        ("shards/ or commits/ made read-only mid-`generate`, then a rerun", lambda rng, n: diskfaults.generate_trial(
            small_shards, store, reference,
            [diskfaults.draw_fault(rng, ("shards", "commits"), 0, 0, shards // 6) for _ in range(2)], f"trial {n}")),
        ("full disk (0.2–20 KB) or a read-only folder under `store copy`, then a rerun",
         lambda rng, n: diskfaults.copy_trial(
             ctx["train_store"], dest, [diskfaults.draw_fault(rng, ("fsize", "shards", "commits"), 200, 20_000,
                                                              shards // 3) for _ in range(2)], f"trial {n}")),
        ("full disk under `store export`, then a rerun", lambda rng, n: diskfaults.export_trial(
            ctx["train_store"], to, exported, rng.randint(len(exported) // 10, len(exported) - 1), f"trial {n}")),
    ]
    rows = []
    for what, trial in plans:
        done = [trial(bytedamage.trial_rng(seed, f"disk {what}", n), n)
                for n in (range(trials) if only_trial is None else [only_trial])]
        failures = [f"{t.name}: {v}" for t in done for v in t.violations]
        say(f"{what}: {sum(t.survived for t in done)}/{sum(t.injected for t in done)} survived {failures[:2]}")
        rows.append(Row(what, sum(t.injected for t in done), sum(t.survived for t in done), sum(t.lost for t in done),
                        sum(t.doubled for t in done), sum(t.altered for t in done), failures[:5]))
    return rows


# -- S3 faults -------------------------------------------------------------------------------------
def s3_faults(ctx: dict[str, Any], trials: int, seed: int, only_trial: int | None = None) -> list[Row]:
    """bench/s3faults.py: `generate` and `store copy` to s3:// (moto) through a seeded fault proxy,
    twice, then straight to S3; injected counts the faulty answers that reached the client."""
    import s3faults

    _, reference = store_contents(ctx["train_store"])
    s3 = s3faults.S3Server()
    try:
        plans = [
            ("`generate`", lambda url: generate_args(ctx["teacher"], ctx["prompts"], url)),
            ("`store copy`", lambda url: ["store", "copy", ctx["train_store"], url]),
        ]
        rows = []
        for what, args in plans:
            done = []
            for n in range(trials) if only_trial is None else [only_trial]:
                url = f"s3://{s3.bucket}/{what.strip('`').replace(' ', '-')}-{n}.store"
                rng = bytedamage.trial_rng(seed, f"s3 {what}", n)
                done.append(s3faults.s3_trial(s3, args(url), url, reference, rng, f"trial {n}"))
            failures = [f"{t.name}: {v}" for t in done for v in t.violations]
            gave_up = sum(t.failed_runs for t in done)
            say(f"S3 faults under {what}: {sum(t.survived for t in done)}/{sum(t.injected for t in done)} survived, "
                f"{gave_up} runs gave up {failures[:2]}")
            rows.append(Row(f"S3 500, 503 SlowDown, timeouts, dropped connections under {what} to s3:// "
                            f"({gave_up} of {2 * len(done)} runs gave up, in one line), then a clean rerun",
                            sum(t.injected for t in done), sum(t.survived for t in done), sum(t.lost for t in done),
                            sum(t.doubled for t in done), sum(t.altered for t in done), failures[:5]))
        return rows
    finally:
        s3.stop()


def readable_contents(url: str) -> tuple[list[str], dict[str, Any], list[str]]:
    """`store_contents` of every shard that reads, and the shards that do not."""
    from potstill.store import open_store

    if not os.path.exists(os.path.join(url, "manifest.json")):
        return [], {}, ["(no manifest.json)"]
    store = open_store(url, strict=False)
    ids: list[str] = []
    records: dict[str, Any] = {}
    unreadable = [shard for shard, _ in store.bad_commits]
    for name in store.shard_names:
        try:
            got = {rec.id: canonical(rec) for rec in store.iter_shard(name, with_hidden=True)}
        except Exception:
            unreadable.append(name)
            continue
        ids += store.shard_ids(name).to_pylist()
        records.update(got)
    return ids, records, unreadable


def writer_clash(ctx: dict[str, Any], trials: int, seed: int, only_trial: int | None = None) -> Row:
    """Two `generate` runs of the same prompts into one new store with the same --writer-id, the
    second started a seeded 0-3 s after the first. Either may refuse (one line, no traceback); what
    the store ends holding must be the reference's records (the store `prepare` generated with the
    same command), each once, byte for byte, and it must verify."""
    ids_ref, reference = store_contents(ctx["train_store"])
    injected = survived = lost = doubled = altered = 0
    failures: list[str] = []
    for n in range(trials) if only_trial is None else [only_trial]:
        rng = bytedamage.trial_rng(seed, "clash", n)
        store = os.path.join(ctx["work"], f"clash-{n}.store")
        shutil.rmtree(store, ignore_errors=True)
        args = [*generate_args(ctx["teacher"], ctx["prompts"], store), "--writer-id", "clash"]
        cmd = [sys.executable, "-m", "potstill.cli.main", *args]
        with tempfile.TemporaryFile("w+") as err1, tempfile.TemporaryFile("w+") as err2:
            first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err1, text=True, env=ENV, cwd=REPO)
            time.sleep(rng.uniform(0, 3))
            second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err2, text=True, env=ENV, cwd=REPO)
            codes = first.wait(600), second.wait(600)
            err1.seek(0)
            err2.seek(0)
            errs = err1.read() + err2.read()
        injected += 1
        problems = [f"a run raised: {errs[-300:]}"] if "Traceback" in errs else []
        ids, records, unreadable = readable_contents(store)
        if unreadable:
            refusal = [ln for ln in errs.splitlines() if "error" in ln.lower()][-1:]
            problems.append(f"shards {', '.join(unreadable[:3])} do not read (exits {codes}; {refusal})")
        missing = len(set(reference) - set(ids))
        twice = len(ids) - len(set(ids))
        changed = sum(1 for rid, content in records.items() if rid in reference and content != reference[rid])
        if os.path.exists(store):
            problems += verify_problems(store, "after both runs", leftovers_allowed=False)[:2]
        if missing or twice or changed:
            problems.append(f"{missing} lost, {twice} doubled, {changed} altered (exits {codes})")
        lost, doubled, altered = lost + missing, doubled + twice, altered + changed
        survived += not problems
        failures += [f"trial {n}: {p}" for p in problems[:2]]
        say(f"writer clash {n}: exits {codes}: {problems[:3] or 'ok'}")
    return Row(f"two `generate` runs with one --writer-id at once ({len(ids_ref)} records each)", injected,
               survived, lost, doubled, altered, failures[:5])


# -- damaged stores --------------------------------------------------------------------------------
FILE_KINDS = bytedamage.FILE_KINDS  # which store file is which kind, one list for both campaigns


def _shard_of(rel: str) -> str | None:
    parts = rel.split("/")
    if parts[0] == "commits":
        return parts[1][: -len(".json")]
    return parts[1] if parts[0] == "shards" else None


def _truncate(path: str, rng: random.Random) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: rng.randrange(0, len(data))])


def _wrong_checksum(path: str, rng: random.Random) -> None:
    """A commit record that parses but lists a wrong sha256 for one of its files."""
    with open(path) as f:
        commit = json.load(f)
    entry = rng.choice(commit["files"])
    entry["sha256"] = "0" * 64
    with open(path, "w") as f:
        json.dump(commit, f, indent=1)


DAMAGES: list[tuple[str, str, Callable[[str, random.Random], None]]] = [  # (what, file kind, how)
    *[(f"flipped bytes: {kind}", kind, lambda p, r: flip_bytes(p, r.randint(1, 8), r.randrange(1 << 30)))
      for kind in FILE_KINDS],
    ("commit record truncated", "commit record", _truncate),
    ("commit record lists a wrong sha256", "commit record", _wrong_checksum),
    ("shard file deleted", "records.arrow", lambda p, r: os.remove(p)),
]


def damage_trial(pristine: str, scratch: str, kind: str, how: Callable[[str, random.Random], None],
                 rng: random.Random, records: dict[str, int]) -> tuple[bool, int, str]:
    """Damage one file of a copy of `pristine`; returns (named correctly and kept, records of other
    shards that verify flagged or clean removed, what went wrong)."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(pristine, scratch)
    before = files_under(scratch)
    rel = rng.choice(sorted(r for r in before if FILE_KINDS[kind](r)))
    how(os.path.join(scratch, rel), rng)
    target = _shard_of(rel) or rel
    check = run_potstill(["store", "verify", "--json", scratch])
    if kind == "manifest.json":  # the store itself cannot be read: one line naming the file
        lines = [ln for ln in check.stderr.splitlines() if ln.strip()]
        ok = check.returncode == 1 and len(lines) == 1 and "manifest.json" in lines[0] and "Traceback" not in check.stderr
        return ok, 0, "" if ok else f"{rel}: exit {check.returncode}: {check.tail(3)}"
    try:
        report = json.loads(check.stdout)
    except json.JSONDecodeError:
        return False, 0, f"{rel}: verify printed no report (exit {check.returncode}): {check.tail(3)}"
    innocent = [p for p in report["problems"] if target not in p]
    lost = sum(n for shard, n in records.items() if shard != target and any(shard in p for p in innocent))
    clean = run_potstill(["store", "verify", "--clean", scratch])
    after = files_under(scratch)
    removed = sorted(set(before) - set(after) - {rel})
    lost += sum(n for shard, n in records.items() if any(_shard_of(r) == shard for r in removed))
    ok = (check.returncode == 1 and report["problems"] and not innocent and not removed
          and clean.returncode == 1 and "Traceback" not in check.stderr + clean.stderr)
    why = "" if ok else (f"{rel}: exit {check.returncode}, problems {report['problems'][:3]}, "
                         f"removed by --clean {removed[:3]}")
    return bool(ok), lost, why


def damaged_stores(ctx: dict[str, Any], trials: int, seed: int, only_trial: int | None = None) -> list[Row]:
    pristine, scratch = ctx["train_store"], os.path.join(ctx["work"], "damaged.store")
    from potstill.store import open_store

    records = {c.shard: c.records for c in open_store(pristine).commits}
    rows = []
    for what, kind, how in DAMAGES:
        results = []
        for n in range(trials) if only_trial is None else [only_trial]:  # trial n: its own seeded randomness
            ok, lost, why = damage_trial(pristine, scratch, kind, how, bytedamage.trial_rng(seed, what, n), records)
            results.append((ok, lost, f"trial {n}: {why}" if why else ""))
        say(f"{what}: {sum(ok for ok, _, _ in results)}/{len(results)} named correctly")
        rows.append(Row(f"{what} → `store verify`", len(results), sum(ok for ok, _, _ in results),
                        sum(lost for _, lost, _ in results), 0, 0, [why for ok, _, why in results if not ok][:3]))
    return rows


def refusals(ctx: dict[str, Any], seed: int, quick: bool) -> list[Row]:
    """Readers and writers on a damaged store: `train` (one epoch, so that every shard is read) stops
    in one line naming the shard (or, with --skip-bad-shards, leaves it out and names it); `generate`
    refuses a store with a damaged commit record without touching it."""
    rng = random.Random(seed)
    store = ctx["train_store"]
    scratch = os.path.join(ctx["work"], "refusal.store")
    from potstill.store import open_store

    shard = rng.choice(open_store(store).shard_names)

    def nan_logprobs(path: str) -> None:
        import numpy as np

        def change(flat: np.ndarray) -> None:
            flat[rng.randrange(len(flat))] = np.nan
        rewrite_column(path, shard, "topk_logprobs", change)

    damages: list[tuple[str, Callable[[str], None]]] = [
        ("flipped bytes in records.arrow", lambda p: flip_bytes(f"{p}/shards/{shard}/records.arrow", 4, seed)),
        ("flipped bytes in a hidden-state data file", lambda p: flip_bytes(f"{p}/shards/{shard}/hidden/layer_2/c/0/0", 4, seed)),
        ("NaN log-probs, checksums rewritten to match", nan_logprobs),
        ("commit record truncated", lambda p: _truncate(f"{p}/commits/{shard}.json", rng)),
    ]
    if quick:
        damages = damages[:1]
    train = ["train", "--student", ctx["student"], "--epochs", "1", "--batch-size", "8", "--num-workers", "1",
             "--hidden-map", "2:2", "--report-to", "none", "--eval-fraction", "0", "--save-steps", "100"]
    rows = []
    for what, damage in damages:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(store, scratch)
        damage(scratch)
        failures = []
        stop = run_potstill([*train, "--store", scratch, "--out", os.path.join(ctx["work"], "refused-out")])
        errors = [ln for ln in stop.stderr.splitlines() if "error: " in ln]
        if not (stop.returncode == 1 and len(errors) == 1 and shard in errors[0] and "Traceback" not in stop.stderr):
            failures.append(f"train: exit {stop.returncode}: {stop.tail(3)}")
        out = os.path.join(ctx["work"], "skipped-out")
        shutil.rmtree(out, ignore_errors=True)
        skip = run_potstill([*train, "--store", scratch, "--out", out, "--skip-bad-shards"])
        if skip.returncode != 0:
            failures.append(f"train --skip-bad-shards: exit {skip.returncode}: {skip.tail(3)}")
        else:
            with open(os.path.join(out, "training_report.json")) as f:
                if shard not in json.load(f)["skipped_shards"]:
                    failures.append("train --skip-bad-shards: the report does not name the shard")
        tried = 2
        if what.startswith("commit record"):
            before = files_under(scratch)
            gen = run_potstill(generate_args(ctx["teacher"], ctx["prompts"], scratch))
            lines = [ln for ln in gen.stderr.splitlines() if ln.strip()]
            if not (gen.returncode == 1 and len(lines) == 1 and shard in lines[0]) or files_under(scratch) != before:
                failures.append(f"generate: exit {gen.returncode}, store changed: {files_under(scratch) != before}: "
                                f"{gen.tail(3)}")
            tried += 1
        say(f"{what}: train, train --skip-bad-shards{', generate' if tried == 3 else ''}: "
            f"{failures or 'ok'}")
        rows.append(Row(f"{what} → `train` stops / skips{', `generate` refuses' if tried == 3 else ''}",
                        tried, tried - len(failures), 0, 0, 0, failures))
    return rows


def byte_damage(ctx: dict[str, Any], seed: int, files_per_kind: int, only_trial: int | None) -> list[Row]:
    """bench/bytedamage.py over a copy of the generated store: one row per file kind."""
    from potstill.store import open_store

    pristine, scratch = ctx["train_store"], os.path.join(ctx["work"], "bytes.store")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(pristine, scratch)
    records = {c.shard: c.records for c in open_store(pristine).commits}
    plan = bytedamage.trial_plan(pristine, seed, files_per_kind)
    if only_trial is not None:
        plan = [t for t in plan if t.index == only_trial]
    by_kind: dict[str, list[bytedamage.Result]] = {}
    for trial in plan:
        result = bytedamage.run_trial(scratch, trial, seed, records, pristine)
        by_kind.setdefault(result.kind, []).append(result)
        if only_trial is not None:
            say(f"{trial.name}: {'survived' if result.survived else result.why}")
    rows = []
    for kind, results in by_kind.items():
        files = len({r.trial.rel for r in results})
        bad = [f"{r.trial.name}: {r.why}" for r in results if not r.survived]
        say(f"byte damage, {kind}: {len(results) - len(bad)}/{len(results)} named correctly")
        label = f"{files} file{'s' if files > 1 else ''}"
        rows.append(Row(f"{kind} ({label}) flipped, zeroed, cut, extended, deleted → `store verify`, checked read",
                        len(results), len(results) - len(bad), sum(r.lost for r in results), 0, 0, bad[:5]))
    return rows


# -- hostile prompts -------------------------------------------------------------------------------
def hostile_lines() -> list[tuple[bytes, str | None]]:
    """(raw line, reason it is skipped for; None: odd but valid, written as given)."""
    lines: list[tuple[bytes, str | None]] = [(raw.encode(), reason) for raw, reason in HOSTILE_LINES.values()]
    lines += [
        (b'{"id": "latin-1", "prompt": "caf\xe9"}', "not valid UTF-8"),
        (b'\xff\xfe{"id": "utf-16-bom", "prompt": "a"}', "malformed JSON"),
        (b'{"id": "cut", "prompt": "a"', "malformed JSON"),
        (b"[1, 2, 3]", "expected an object"),
        (b'"a string"', "expected an object"),
        (b"null", "expected an object"),
        (b'{"id": "no-prompt"}', "no 'prompt'"),
        (b'{"id": "", "prompt": "a"}', "is empty"),
        (b'{"id": {"a": 1}, "prompt": "a"}', "must be a string or an integer"),
        (b'{"id": "int-prompt", "prompt": 5}', "must be a string"),
        (b'{"id": "empty-prompt", "prompt": ""}', "empty prompt"),
        (b'{"id": "r0001", "prompt": "again"}', "duplicate id"),
        (b'{"id": "long", "prompt": "' + b"the quick brown fox " * 20000 + b'", "completion": "x"}', "tokens"),
        (b'{"id": "controls", "prompt": "tab\\t nul \\u0000 bidi \\u202e end", "completion": "x"}', None),
        (b'{"id": "emoji", "prompt": "a \\ud83d\\ude00 pair", "completion": "x"}', None),
        (b'{"id": 123456789012345678901234567890, "prompt": "an integer id", "completion": "x"}', None),
        (b'{"id": "nan", "prompt": "a", "completion": "b", "score": NaN}', None),
    ]
    return lines


def hostile_prompts(ctx: dict[str, Any], seed: int) -> Row:
    good = prompt_rows(24, seed=seed)
    rng = random.Random(seed)
    hostile = hostile_lines()
    lines: list[tuple[bytes, str | None, bool]] = [(json.dumps(r).encode(), None, True) for r in good]
    for raw, reason in hostile:
        lines.insert(rng.randrange(2, len(lines) + 1), (raw, reason, False))  # after r0001's first line
    path = os.path.join(ctx["work"], "hostile.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(raw for raw, _, _ in lines) + b"\n")
    store = os.path.join(ctx["work"], "hostile.store")
    run = run_potstill([*generate_args(ctx["teacher"], path, store), "--json"])
    failures = []
    if run.returncode != 0 or "Traceback" in run.stderr:
        return Row("hostile prompt lines → `generate`", len(hostile), 0, len(good), 0, 0,
                   [f"exit {run.returncode}: {run.tail(3)}"])
    errors = {e["line"]: e for e in json.loads(run.stdout)["errors"]}
    ids, records = store_contents(store)
    kept = {rid: content for rid, content in records.items()}
    survived = 0
    for number, (raw, reason, is_good) in enumerate(lines, start=1):
        if is_good:
            continue
        if reason is not None:
            error = errors.get(number)
            if error is not None and reason in error["reason"]:
                survived += 1
            else:
                failures.append(f"line {number}: expected skipped for {reason!r}, got {error}")
            continue
        row = json.loads(raw)
        written = kept.get(str(row["id"]))
        prompt = dict(written).get("prompt") if written is not None else None
        if prompt == row["prompt"]:
            survived += 1
        else:
            failures.append(f"line {number}: expected written as given, got prompt {prompt!r}")
    lost = sum(1 for r in good if r["id"] not in kept)
    return Row("hostile prompt lines → `generate` (skipped with line and reason, or written as given)",
               len(hostile), survived, lost, len(ids) - len(set(ids)), 0, failures[:5])


# -- main ------------------------------------------------------------------------------------------
def prepare(work: str, seed: int) -> dict[str, Any]:
    """The tiny teacher and student (the tests' too, bench/common.py), a prompt file, and a store generated from it."""
    from transformers import AutoTokenizer

    tok, teacher = os.path.join(work, "tokenizer"), os.path.join(work, "teacher")
    build_tokenizer(tok)
    build_llama(teacher, len(AutoTokenizer.from_pretrained(tok)), hidden=32, layers=2, seed=0, tokenizer_dir=tok)
    student = build_student(os.path.join(work, "student"), tok, hidden=16)
    prompts = write_jsonl(os.path.join(work, "prompts.jsonl"), prompt_rows(48, seed=seed))
    train_store = os.path.join(work, "train.store")
    made = run_potstill(generate_args(teacher, prompts, train_store))
    if made.returncode != 0:
        raise SystemExit(f"could not generate the store: {made.tail()}")
    return {"work": work, "tokenizer": tok, "teacher": teacher, "student": student, "prompts": prompts,
            "train_store": train_store}


def table(rows: list[Row]) -> str:
    out = ["| fault | injected | survived | lost | doubled | altered |", "|---|---:|---:|---:|---:|---:|"]
    total = Row("**all**", sum(r.injected for r in rows), sum(r.survived for r in rows),
                sum(r.lost for r in rows), sum(r.doubled for r in rows), sum(r.altered for r in rows))
    out += [f"| {r.fault} | {r.injected} | {r.survived} | {r.lost} | {r.doubled} | {r.altered} |"
            for r in [*rows, total]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few of each, to check the script runs")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--only", default="kills,disk,s3,clash,flips,bytes,prompts",
                        help="kills (export, serve, ray and, where vllm is installed, vllm among them), export, "
                        "serve, ray, vllm, disk, s3, clash, flips, bytes, prompts (comma separated)")
    parser.add_argument("--clash-trials", type=int, default=3, help="pairs of runs sharing one --writer-id")
    parser.add_argument("--trial", type=int, help="rerun trial N of each campaign of --only alone (a kill round, "
                        "a damaged copy of each kind, a byte-damage trial), as the table's failures name them")
    parser.add_argument("--bytes-files", type=int, default=16, help="files of each kind damaged byte by byte")
    parser.add_argument("--generate-kills", type=int, default=40)
    parser.add_argument("--copy-kills", type=int, default=20)
    parser.add_argument("--train-kills", type=int, default=10)
    parser.add_argument("--export-kills", type=int, default=8)
    parser.add_argument("--serve-kills", type=int, default=6)
    parser.add_argument("--ray-kills", type=int, default=8, help="kills of generate --executor ray (driver, actor)")
    parser.add_argument("--vllm-kills", type=int, default=8, help="kills of `generate --backend vllm`")
    parser.add_argument("--disk-trials", type=int, default=3, help="trials of each disk fault row, two faults each")
    parser.add_argument("--s3-trials", type=int, default=2, help="trials of each S3 row, two faulted runs each")
    parser.add_argument("--copy-shards", type=int, default=120)
    parser.add_argument("--flip-trials", type=int, default=6, help="damaged copies of the store per kind of damage")
    parser.add_argument("--json", help="also write the rows (and their failures) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (printed)")
    args = parser.parse_args()
    if args.quick:
        args.generate_kills, args.copy_kills, args.train_kills, args.copy_shards, args.flip_trials = 5, 5, 2, 30, 1
        args.bytes_files, args.clash_trials, args.export_kills, args.disk_trials = 2, 1, 2, 1
        args.s3_trials, args.serve_kills, args.ray_kills, args.vllm_kills = 1, 2, 2, 2
    only = set(args.only.split(","))
    started = time.monotonic()
    say(f"seed {args.seed}")
    work = tempfile.mkdtemp(prefix="potstill-reliability-")
    try:
        ctx = prepare(work, args.seed)
        rows: list[Row] = []
        if "kills" in only:
            rows.append(kill_generate(ctx, args.generate_kills, args.seed, args.trial))
            rows.append(kill_copy(ctx, args.copy_kills, args.seed, args.copy_shards, args.trial))
            rows.append(kill_train(ctx, args.train_kills, args.seed, args.trial))
        if only & {"kills", "export"}:  # (`export`, `serve` alone: only that kill campaign)
            rows.append(kill_export(ctx, args.export_kills, args.seed, args.trial))
        if only & {"kills", "serve"}:
            rows.append(kill_serve(ctx, args.serve_kills, args.seed, args.trial))
        if only & {"kills", "ray"}:
            rows.append(kill_ray(ctx, args.ray_kills, args.seed, args.trial))
        if "vllm" in only or ("kills" in only and importlib.util.find_spec("vllm") is not None):
            rows.append(kill_generate_vllm(ctx, args.vllm_kills, args.seed, args.trial))
        if "disk" in only:
            rows += disk_faults(ctx, args.disk_trials, args.seed, args.trial)
        if "s3" in only:
            rows += s3_faults(ctx, args.s3_trials, args.seed, args.trial)
        if "clash" in only:
            rows.append(writer_clash(ctx, args.clash_trials, args.seed, args.trial))
        if "flips" in only:
            rows += damaged_stores(ctx, args.flip_trials, args.seed, args.trial)
            rows += refusals(ctx, args.seed, args.quick)
        if "bytes" in only:
            rows += byte_damage(ctx, args.seed, args.bytes_files, args.trial)
        if "prompts" in only:
            rows.append(hostile_prompts(ctx, args.seed))
    finally:
        if args.keep:
            say(f"working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    failures = [f"{r.fault}: {f}" for r in rows for f in r.failures]
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"({time.monotonic() - started:.0f} s, seed {args.seed}{', --quick' if args.quick else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "quick": args.quick, "rows": [asdict(r) for r in rows]}, f, indent=2)
    if failures or any(r.survived < r.injected or r.lost or r.doubled or r.altered for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
