"""A store on s3:// against a real S3-compatible server (moto) started on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from genhelpers import run_main
from storehelpers import committed_ids

from potstill.store import create_store, open_store, verify_store

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("potstill-test")
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_round_trip_verify_and_cli(s3_env, tmp_path):
    url = "s3://potstill-test/run1.store"
    m = make_manifest(layers=((2, 16, "bfloat16"), (1, 8, "float16")), chunk_tokens=8)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(7)
    recs = [random_record(rng, f"s{i}", m) for i in range(11)]
    with store.writer("gpu0", shard_records=5) as w:
        for r in recs:
            w.write(copy.deepcopy(r))

    store = open_store(url)
    assert store.num_records == 11 and len(store.commits) == 3
    for i, want in enumerate(recs):
        got = store.record(i, with_hidden=True)
        assert got.id == want.id
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs)
        for layer, h in want.hidden.items():
            np.testing.assert_array_equal(got.hidden[layer], h)
    with open(os.path.join(store.tokenizer_dir, "tokenizer.json"), "rb") as f:
        assert f.read() == TOKENIZER_FILES["tokenizer.json"]
    assert verify_store(url).ok

    env = {**os.environ, **s3_env}
    out = subprocess.run([sys.executable, "-m", "potstill.cli.main", "store", "info", url, "--json"],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["records"] == 11
    out = run_main(["store", "verify", url])  # (this process's environment is the server's: the fixture set it)
    assert out.returncode == 0, out.stderr
    assert "OK: 3 shards, 11 records" in out.stdout


def test_copy_local_store_to_s3_and_back(s3_env, tmp_path):
    """Sharing a store: `potstill store copy` to s3:// and back, checksums checked, reruns resume."""
    from potstill.store import copy_store

    local = str(tmp_path / "made-here.store")
    m = make_manifest(layers=((2, 16, "bfloat16"),), chunk_tokens=8)
    store = create_store(local, m, TOKENIZER_FILES)
    rng = np.random.default_rng(3)
    recs = [random_record(rng, f"c{i}", m) for i in range(9)]
    with store.writer("gpu0", shard_records=4) as w:
        for r in recs:
            w.write(copy.deepcopy(r))

    url = "s3://potstill-test/shared.store"
    env = {**os.environ, **s3_env}
    out = subprocess.run([sys.executable, "-m", "potstill.cli.main", "store", "copy", local, url],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "copied 3 shards (9 records" in out.stdout
    assert verify_store(url).ok

    # a rerun copies nothing twice; a shard committed at the source since then is picked up
    with open_store(local).writer("gpu1") as w:
        w.write(copy.deepcopy(random_record(rng, "late", m)))
    report = copy_store(local, url)
    assert len(report.shards_copied) == 1 and len(report.shards_skipped) == 3

    back = str(tmp_path / "read-elsewhere.store")
    copy_store(url, back)
    got = open_store(back)
    assert sorted(committed_ids(back)) == sorted([r.id for r in recs] + ["late"])
    for i in range(got.num_records):
        r = got.record(i, with_hidden=True)
        if r.id == "late":
            continue
        want = recs[int(r.id[1:])]
        np.testing.assert_array_equal(r.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(r.hidden[2], want.hidden[2])
    assert verify_store(back).ok
