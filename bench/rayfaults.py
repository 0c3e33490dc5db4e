"""Kills of `potstill generate --executor ray`: the driver (`kill -9` of its process group, its actors
ended by Ray after it) and a teacher actor mid-block (`kill -9` of the process holding a block's writer
lease after that block committed a shard; Ray restarts it and runs the block again).

A round, on a fresh store: the driver killed at a seeded delay after its first commit record, then a
rerun of the same command with an actor killed mid-block, which must finish the store by itself. After
each kill every committed record is the reference's (the local executor's, uninterrupted), once, and
the store verifies; after the round nothing is missing and nothing is left behind. The drivers join
one Ray instance that this process starts (`--ray-address`), as a cluster's users do.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import faultcampaigns
from faultcampaigns import (
    FINAL,
    Campaign,
    Outcome,
    Trigger,
    count_entries,
    generate_args,
    run_potstill,
    store_invariants,
    strays,
)

BLOCK_PREFIX = "ray-"


def ray_args(teacher: str, prompts: str, store: str, address: str) -> list[str]:
    """The fault campaigns' generate settings (one record per batch, two-record shards), on Ray."""
    return [*generate_args(teacher, prompts, store), "--executor", "ray", "--ray-address", address,
            "--num-actors", "2"]


def kill_an_actor(store: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first actor seen holding a block's writer lease once that block has committed a shard."""
    writers, commits = os.path.join(store, "writers"), os.path.join(store, "commits")
    while not stop.is_set():
        try:
            leases = [n[:-5] for n in os.listdir(writers)
                      if n.startswith(BLOCK_PREFIX) and n.endswith(".json") and not n.endswith(".run.json")]
            done = os.listdir(commits)
        except FileNotFoundError:
            leases, done = [], []
        for writer in leases:
            block = writer.rsplit(".", 1)[0]  # (a block's writer threads: ray-<hash>.0, .1)
            if any(n.startswith(block) for n in done):
                try:
                    with open(os.path.join(writers, writer + ".json")) as f:
                        pid = json.load(f)["pid"]
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    continue
                killed.append(pid)
                return
        time.sleep(0.002)


def wait_for_actors_gone(store: str, timeout: float = 60.0) -> None:
    """Wait until no writer of the store is alive. A killed driver's actors run on until Ray sees
    their job gone (a second or so); the checks are of what is left once every process of the killed
    run has ended. An actor still alive after `timeout` is left for the checks to report."""
    from potstill.store import verify_store

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(os.path.join(store, "manifest.json")):
        if not any(left.live for left in verify_store(store).leftovers):
            return
        time.sleep(0.5)


def ray_round(teacher: str, prompts: str, workdir: str, reference: dict[str, Any], address: str,
              rng: random.Random, name: str, log: Callable[[str], None] | None = None) -> Campaign:
    # The drivers join this process's Ray instance: they need what `ray.init` put in the environment
    # (RAY_AUTH_MODE: Ray's token authentication).
    faultcampaigns.ENV.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
    campaign = Campaign("generate --executor ray")
    store = os.path.join(workdir, f"{name}.store")
    args = ray_args(teacher, prompts, store, address)
    commits = os.path.join(store, "commits")
    delay = round(rng.uniform(0.0, 1.0), 3)
    campaign.kill(args, Trigger(f"kill -9 of the driver {delay:.3f} s after its first commit record", delay=delay,
                                ready=lambda: count_entries(commits) >= 1), log, store)
    wait_for_actors_gone(store)
    campaign.violations += store_invariants(store, reference, campaign.where(), leftovers_allowed=True)
    campaign.checks += 1

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_an_actor, args=(store, stop, killed), daemon=True)
    killer.start()
    try:
        run = run_potstill(args)
    finally:
        stop.set()
        killer.join()
    what = "kill -9 of an actor mid-block (after one of its shards), the run going on"
    campaign.outcomes.append(Outcome(Trigger(what), bool(killed), run.returncode, run.seconds, run.stdout, run.stderr))
    campaign.final = run
    if log is not None:
        log(f"  {name}: {what}: {'killed' if killed else 'the run ended first'}; exit {run.returncode}")
    where = f"{FINAL} ({campaign.where()})"
    if run.returncode != 0:
        campaign.violations.append(f"{where}: exit {run.returncode}: {run.tail(3)}")
    campaign.violations += store_invariants(store, reference, where, leftovers_allowed=False)
    ids = [] if not os.path.exists(os.path.join(store, "manifest.json")) else _ids(store)
    campaign.lost = len(set(reference) - set(ids))
    campaign.doubled = len(ids) - len(set(ids))
    if campaign.lost:
        campaign.violations.append(f"{where}: {campaign.lost} record(s) of the reference run are missing")
    campaign.violations += [f"{where}: {s} remains in the store" for s in strays(store)]
    return campaign


def _ids(store: str) -> list[str]:
    from potstill.store import open_store

    return open_store(store).id_index().ids().to_pylist()
