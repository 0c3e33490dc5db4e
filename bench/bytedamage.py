"""Byte damage, file by file: every file of a store flipped, zeroed, cut short (a torn write) and
extended at seeded offsets in each third of it, and deleted (a reordered write: the commit record
on disk, a file it lists not), each checked in-process (hundreds a second, no CLI start-up).

A trial survives when `verify_store` names the damaged file (or its shard) and nothing else, never
raising anything but a one-line `PotstillError` naming `manifest.json` when that file is the one
damaged; when `verify --clean` removes nothing; and, for a shard's file, when a checked read of the
shard (`verify_reads=True`, the loader's) refuses it instead of returning its records as good.

Each trial's randomness comes from (seed, "bytes", trial index), and the trials of a store are
listed in a fixed order, so `trial_plan(...)[N]` reruns trial N alone.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass

HOWS = ("flip", "zero", "truncate", "extend", "delete")
JSON_SPACE = b" \t\r\n"  # whitespace between JSON tokens: one for another changes nothing
THIRDS = ("head", "middle", "tail")

FILE_KINDS: dict[str, Callable[[str], bool]] = {
    "manifest.json": lambda rel: rel == "manifest.json",
    "tokenizer file": lambda rel: rel.startswith("tokenizer/"),
    "commit record": lambda rel: rel.startswith("commits/"),
    "records.arrow": lambda rel: rel.endswith("/records.arrow"),
    "ids.arrow": lambda rel: rel.endswith("/ids.arrow"),
    "pieces.arrow": lambda rel: rel.endswith("/pieces.arrow"),
    "Zarr group metadata": lambda rel: rel.endswith("/hidden/zarr.json"),
    "Zarr array metadata": lambda rel: "/hidden/layer_" in rel and rel.endswith("/zarr.json"),
    "hidden-state data file": lambda rel: "/hidden/layer_" in rel and "/c/" in rel,
}


def trial_rng(seed: int, campaign: str, index: int) -> random.Random:
    """The randomness of one trial: the same (seed, campaign, index) always draws the same."""
    return random.Random(f"{seed}/{campaign}/{index}")


def file_kind(rel: str) -> str:
    return next((kind for kind, match in FILE_KINDS.items() if match(rel)), f"other ({os.path.basename(rel)})")


def shard_of(rel: str) -> str | None:
    parts = rel.split("/")
    if parts[0] == "commits":
        return parts[1][: -len(".json")]
    return parts[1] if parts[0] == "shards" else None


def store_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for n in names)


def checked_files(root: str) -> list[str]:
    """The files whose damage a reader must name: all but the run records (runs/: informational, no
    checksum covers them and nothing reads them as data, store format §10.2)."""
    return [rel for rel in store_files(root) if not rel.startswith("runs/")]


@dataclass(frozen=True)
class Trial:
    index: int
    rel: str  # the damaged file, relative to the store
    how: str  # one of HOWS
    third: str  # where in the file (THIRDS); "end" for extend

    @property
    def name(self) -> str:
        return f"bytes#{self.index} {self.how} {self.third} of {self.rel}"


def trial_plan(root: str, seed: int, files_per_kind: int, every_third: bool = True) -> list[Trial]:
    """Up to `files_per_kind` files of each kind (a seeded choice; every one of a smaller kind), each
    damaged each way, in each third (an extension only at the end): a fixed order for a seed.
    `every_third=False` (a quick slice): each of flip, zero and cut short in one third, a different
    one for each, so that every file is still damaged in each of its thirds."""
    hows = ("flip", "zero", "truncate")
    ways = [(how, third) for n, how in enumerate(hows) for i, third in enumerate(THIRDS) if every_third or i == n]
    ways += [("extend", "end"), ("delete", "whole")]
    by_kind: dict[str, list[str]] = {}
    for rel in checked_files(root):
        by_kind.setdefault(file_kind(rel), []).append(rel)
    pick = trial_rng(seed, "bytes-files", 0)
    chosen = sorted(rel for rels in by_kind.values() for rel in pick.sample(rels, min(len(rels), files_per_kind)))
    # (A commit record deleted is not damage: it is a shard never committed, which verify --clean
    # removes as a dead writer's leftover; the kill campaigns cover it.)
    plan = [(rel, how, third) for rel in chosen for how, third in ways
            if not (how == "delete" and file_kind(rel) == "commit record")]
    return [Trial(i, rel, how, third) for i, (rel, how, third) in enumerate(plan)]


def damage(data: bytes, how: str, third: str, rng: random.Random) -> bytes:
    """`data` damaged `how` at an offset drawn in `third` of it. Never a no-op: a zeroed byte is a
    nonzero one, a flipped byte never turns whitespace into whitespace, a cut always removes a non-whitespace byte (a JSON file cut in its trailing newline
    is the same JSON), an extension is non-whitespace bytes."""
    body = len(data.rstrip()) if how == "truncate" else len(data)
    k = THIRDS.index(third) if third in THIRDS else 2
    low, high = body * k // 3, max(body * (k + 1) // 3, body * k // 3 + 1)
    if how == "extend":
        return data + bytes(rng.randrange(33, 256) for _ in range(rng.randint(1, 64)))
    if how == "truncate":
        return data[: rng.randrange(low, min(high, body))]
    out = bytearray(data)
    if how == "zero":
        nonzero = [i for i in range(low, min(high, len(out))) if out[i]] or [i for i, b in enumerate(out) if b]
        if nonzero:
            out[rng.choice(nonzero)] = 0
            return bytes(out)
    pos = rng.randrange(low, min(high, len(out)))  # flip (or zero of an all-zero file: flip instead)
    flipped = out[pos] ^ rng.randrange(1, 256)
    while out[pos] in JSON_SPACE and flipped in JSON_SPACE:  # a newline turned into a space: the same JSON
        flipped = out[pos] ^ rng.randrange(1, 256)
    out[pos] = flipped
    return bytes(out)


@dataclass
class Result:
    trial: Trial
    kind: str
    survived: bool
    lost: int  # records of other shards that verify flagged or --clean removed
    why: str = ""


def run_trial(store: str, trial: Trial, seed: int, records: dict[str, int], pristine: str) -> Result:
    """Damage `trial.rel` of `store` (a copy of `pristine`), check, and put the store back as it was."""
    from potstill.store import open_store, verify_store
    from potstill.store import reader as store_reader
    from potstill.store.errors import PotstillError

    rng = trial_rng(seed, "bytes", trial.index)
    path = os.path.join(store, trial.rel)
    with open(path, "rb") as f:
        original = f.read()
    kind = file_kind(trial.rel)
    target = shard_of(trial.rel) or trial.rel
    before = store_files(store)
    problems: list[str] = []
    try:
        if trial.how == "delete":  # as a reordered write leaves it: the commit record without its file
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(damage(original, trial.how, trial.third, rng))
        try:
            report = verify_store(store, clean=True)  # the report is the same; cleaning must remove nothing
        except PotstillError as e:
            named = "manifest.json" in str(e) and trial.rel == "manifest.json"
            return Result(trial, kind, named, 0, "" if named else f"verify stopped: {e}")
        except Exception as e:  # a traceback for the user
            return Result(trial, kind, False, 0, f"verify raised {type(e).__name__}: {e}")
        found = [str(p) for p in report.problems]
        innocent = [p for p in found if target not in p]
        lost = sum(n for shard, n in records.items() if shard != target and any(shard in p for p in innocent))
        if not found:
            problems.append("verify found nothing wrong")
        if innocent:
            problems.append(f"verify blamed others: {innocent[:2]}")
        removed = sorted(set(before) - set(store_files(store)) - {trial.rel})
        lost += sum(n for shard, n in records.items() if any(shard_of(r) == shard for r in removed))
        if removed:
            problems.append(f"verify --clean removed {removed[:3]}")
        if trial.rel.startswith("shards/"):  # the loader's checked read must refuse the shard
            store_reader._VERIFIED.clear()  # a cache of digests already checked, by path: not this file's
            try:
                opened = open_store(store, verify_reads=True)
                for _ in opened.iter_shard(target, with_hidden=True):
                    pass
                problems.append("a checked read returned the shard's records as good")
            except PotstillError:
                pass
            except Exception as e:
                problems.append(f"a checked read raised {type(e).__name__}: {e}")
        return Result(trial, kind, not problems, lost, "; ".join(problems))
    finally:
        if set(store_files(store)) != set(before):
            shutil.rmtree(store)
            shutil.copytree(pristine, store)
        with open(path, "wb") as f:
            f.write(original)
