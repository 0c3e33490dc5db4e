"""S3 that fails, throttles, times out and drops connections (bench/s3faults.py: a seeded fault
proxy in front of moto's S3 server): a run that gives up says so in one line, what it committed is
whole, and a clean rerun completes the store with every record once."""

from __future__ import annotations

import random

import pytest
from faultcampaigns import build_copy_source, store_contents

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3faults import FaultProxy, S3Server, run_through, s3_trial

SEED = 11


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.mark.slow
def test_an_s3_that_keeps_failing_is_one_line_and_a_clean_rerun_completes_the_copy(s3, tmp_path):
    """Every request answered 500 or 503 SlowDown: `store copy` to s3:// ended in a traceback."""
    source = str(tmp_path / "src")
    build_copy_source(source, shards=3, seed=SEED)
    url = f"s3://{s3.bucket}/always-failing.store"
    proxy = FaultProxy(s3.endpoint, seed=SEED, rate=1.0, faults=("500", "503 SlowDown"))
    try:
        failed = run_through(["store", "copy", source, url], proxy.start())
    finally:
        proxy.stop()
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr and len(lines) == 1, failed.tail()
    assert lines[0].startswith("error: ") and sum(proxy.injected.values()) >= 1
    rerun = run_through(["store", "copy", source, url], s3.endpoint)
    assert rerun.returncode == 0, rerun.tail()
    assert store_contents(url) == store_contents(source)


@pytest.mark.slow
def test_a_copy_to_s3_through_seeded_faults_ends_whole_after_a_clean_rerun(s3, tmp_path):
    """A seeded slice of the campaign (bench/reliability.py `s3`: more runs, rates up to 40%): a few
    shards at a rate of 10-15%, so that every fault kind is likely drawn while the retries' backoff
    (the time such a test takes) stays short."""
    source = str(tmp_path / "src")
    build_copy_source(source, shards=4, seed=SEED)
    _, reference = store_contents(source)
    url = f"s3://{s3.bucket}/seeded.store"
    trial = s3_trial(s3, ["store", "copy", source, url], url, reference, random.Random(SEED), "copy", faulted_runs=1,
                     rates=(0.1, 0.15))
    assert trial.violations == [] and trial.injected > 0, trial
    assert trial.survived == trial.injected and trial.lost == trial.doubled == trial.altered == 0
