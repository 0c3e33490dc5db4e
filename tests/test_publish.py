"""`potstill store publish`: a store as a Hub dataset folder that reads without potstill and trains
with potstill to the same batches; and the one definition of a store's byte figures."""

from __future__ import annotations

import html
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from genhelpers import run_main
from storehelpers import build_store

from potstill.cli.demo.run import _store_summary, format_table
from potstill.share import store_info
from potstill.share.publish import publish_store
from potstill.store import Store, open_store, verify_store
from potstill.store.errors import StoreError
from potstill.store.manifest import manifest_checksum
from potstill.store.published import hub_repo, is_published, store_from_published
from potstill.store.sizes import store_sizes
from potstill.student_train.data import StoreDataset

# Every built-in kind with each codec it takes; hybrid also without hidden states.
CASES = [
    ("topk", "none", True), ("topk", "packed", True), ("sampled", "none", True), ("sampled", "compact", False),
    ("both", "packed", True), ("hybrid", "packed", False), ("hybrid", "compact", True),
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def potstill(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **OFFLINE, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(tmp_path / "cache"))


def make_store(path: str, kind: str, codec: str, hidden: bool) -> str:
    layers = ((2, 16, "bfloat16"), (4, 24, "float16")) if hidden else ()
    return build_store(path, kind, codec, layers=layers)


def assert_same_records(a: Store, b: Store) -> None:
    left, right = list(a.iter_records(with_hidden=True)), list(b.iter_records(with_hidden=True))
    assert [r.id for r in left] == [r.id for r in right]
    for x, y in zip(left, right, strict=True):
        for name in ("input_ids", "topk_ids", "topk_logprobs", "token_logprob", "tail_logprob"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u.dtype == v.dtype and np.array_equal(u, v, equal_nan=True), (x.id, name)
        if x.sampled is not None:
            for name in ("offsets", "ids", "counts"):
                assert np.array_equal(getattr(x.sampled, name), getattr(y.sampled, name)), (x.id, name)
        assert (x.score_start, x.hidden_start, x.meta, x.answer, x.rationale) == (
            y.score_start, y.hidden_start, y.meta, y.answer, y.rationale)
        assert x.hidden.keys() == y.hidden.keys()
        for layer in x.hidden:
            assert x.hidden[layer].dtype == y.hidden[layer].dtype and np.array_equal(x.hidden[layer], y.hidden[layer])


@pytest.mark.parametrize(("kind", "codec", "hidden"), CASES)
def test_a_published_store_of_each_kind_and_codec_reads_with_datasets_and_back_exactly(tmp_path, kind, codec, hidden):
    import datasets

    store = open_store(make_store(str(tmp_path / "s.store"), kind, codec, hidden), verify_reads=True)
    folder = str(tmp_path / "pub")
    index = publish_store(store, folder, license="apache-2.0")
    assert sorted(os.listdir(folder)) == sorted(["README.md", "manifest.json", "published.json", "data", "tokenizer"]
                                                + (["hidden"] if hidden else []))
    for rel, entry in index["files"].items():  # every file listed with its true size and sha256
        assert os.path.getsize(os.path.join(folder, rel)) == entry["bytes"]

    rows = list(datasets.load_dataset(folder, split="train", streaming=True))
    originals = {r.id: r for r in store.iter_records()}
    assert sorted(r["id"] for r in rows) == sorted(originals)
    for row in rows[:4]:  # the plain columns are the decoded targets, as float32
        rec = originals[row["id"]]
        assert row["input_ids"] == rec.input_ids.tolist() and row["meta"] == rec.meta
        assert np.array_equal(np.float32(row["token_logprob"]), rec.token_logprob.astype(np.float32))
        if rec.topk_ids is not None:
            assert np.array_equal(np.int32(row["topk_ids"]).reshape(rec.topk_ids.shape), rec.topk_ids)
            assert np.array_equal(np.float32(row["topk_logprobs"]).reshape(rec.topk_ids.shape),
                                  rec.topk_logprobs.astype(np.float32))
        if rec.sampled is not None:
            assert sum(len(x) for x in row["sampled_ids"]) == len(rec.sampled.ids)
            assert [x for pos in row["sampled_counts"] for x in pos] == rec.sampled.counts.tolist()
    if hidden:
        states = list(datasets.load_dataset(folder, "hidden", split="train", streaming=True))
        assert len(states) == 2 * len(originals)
        first = next(s for s in states if s["layer"] == 4)
        want = next(r for r in store.iter_records(with_hidden=True) if r.id == first["id"]).hidden[4]
        assert np.array_equal(np.float32(first["states"]), want.astype(np.float32))

    rebuilt = store_from_published(folder)
    assert verify_store(rebuilt).ok
    assert_same_records(store, open_store(rebuilt, verify_reads=True))


@pytest.mark.parametrize(("kind", "codec", "targets"), [("topk", "packed", "topk"), ("sampled", "compact", "sampled"),
                                                       ("hybrid", "packed", "sampled")])
def test_the_published_folder_trains_to_the_same_batches_as_its_store(tmp_path, kind, codec, targets):
    url = make_store(str(tmp_path / "s.store"), kind, codec, True)
    folder = str(tmp_path / "pub")
    publish_store(open_store(url), folder, license="mit")
    assert is_published(folder) and not is_published(url)
    settings = {"batch_size": 3, "eval_fraction": 0.2, "targets": targets, "hidden_layers": (2, 4), "seed": 5}
    original = StoreDataset.open(url, **settings)
    published = StoreDataset.open(store_from_published(folder), **settings)
    steps = math.ceil(original.batches_per_epoch) + 1  # a full epoch and into the next
    assert published.batches_per_epoch == original.batches_per_epoch
    for a, b in zip(original.batches(0), published.batches(0), strict=False):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
            else:
                assert value == b[key], key
        steps -= 1
        if not steps:
            break
    # resuming from a state: the same batch the store gives at that point
    resumed = StoreDataset.open(store_from_published(folder), **settings)
    assert next(iter(resumed.batches(0, start_batch=3)))["record_ids"] == next(iter(original.batches(0, 3)))["record_ids"]


# Runs each card snippet given as a file in a fresh namespace of one process (a Python start with
# torch and datasets imported once, not once per snippet); prints the last line each one printed.
SNIPPETS = """import contextlib, io, json, sys
last = []
for path in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__"})
    last.append(out.getvalue().strip().splitlines()[-1])
print(json.dumps(last))
"""


def test_the_card_snippet_runs_with_plain_torch_and_datasets(tmp_path):
    kinds = (("topk", "none"), ("sampled", "compact"), ("hybrid", "packed"))
    snippets = []
    for kind, codec in kinds:
        folder = str(tmp_path / f"pub-{kind}")
        publish_store(open_store(make_store(str(tmp_path / f"{kind}.store"), kind, codec, False)), folder,
                      license="mit", repo_id="me/targets")
        card = Path(folder, "README.md").read_text()
        front = yaml.safe_load(card.split("---\n")[1])  # the card's YAML, as the Hub reads it
        assert front["license"] == "mit" and front["configs"] == [
            {"config_name": "default", "default": True, "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
        snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        assert "potstill" not in snippet and 'REPO = "me/targets"' in snippet
        snippets.append(tmp_path / f"snippet-{kind}.py")
        snippets[-1].write_text(snippet.replace('REPO = "me/targets"', f"REPO = {folder!r}"))
    run = subprocess.run([sys.executable, "-c", SNIPPETS, *map(str, snippets)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **OFFLINE})
    assert run.returncode == 0, run.stderr
    losses = json.loads(run.stdout.strip().splitlines()[-1])
    for (kind, _), loss in zip(kinds, losses, strict=True):
        assert math.isfinite(float(loss)) and float(loss) > 0, kind


def test_messages_and_meta_become_nested_columns_or_stay_json_where_their_values_share_no_type(tmp_path):
    import copy

    import datasets
    from common import TOKENIZER_FILES, make_manifest, random_record

    from potstill.store import create_store

    url = str(tmp_path / "mixed.store")
    m = make_manifest(layers=())
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(2)
    metas = [{"n": 1, "src": "a"}, {"n": "one"}, None]  # `n` a number here, text there: no one Arrow type
    messages = [[{"role": "user", "content": "hi"}], None, [{"role": "user", "content": "yo", "name": "b"}]]
    with store.writer("w0") as w:
        for i in range(3):
            rec = random_record(rng, f"m{i}", m)
            rec.meta, rec.messages = metas[i], messages[i]
            w.write(copy.deepcopy(rec))
    folder = str(tmp_path / "pub")
    assert publish_store(open_store(url), folder, license="mit")["nested"] == {"messages": True, "meta": False}
    rows = {r["id"]: r for r in datasets.load_dataset(folder, split="train", streaming=True)}
    assert rows["m2"]["messages"] == [{"role": "user", "content": "yo", "name": "b"}]
    assert rows["m0"]["messages"] == [{"role": "user", "content": "hi", "name": None}]  # every key any record has
    assert json.loads(rows["m1"]["meta"]) == {"n": "one"}
    back = {r.id: r for r in open_store(store_from_published(folder)).iter_records()}
    assert [back[f"m{i}"].meta for i in range(3)] == metas
    assert [back[f"m{i}"].messages for i in range(3)] == messages


def test_publish_without_a_licence_is_refused_in_one_line_and_writes_nothing(tmp_path):
    url = make_store(str(tmp_path / "s.store"), "topk", "none", False)
    out = str(tmp_path / "pub")
    one_line_error(potstill("store", "publish", url, out), "names no licence", "--license")  # (as a process once)
    assert not os.path.exists(out)
    done = run_main(["store", "publish", url, out, "--license", "cc-by-4.0"])
    assert done.returncode == 0 and "14 records" in done.stdout, done.stderr
    one_line_error(run_main(["store", "publish", url, out, "--license", "mit"]), "not an empty folder")
    one_line_error(run_main(["store", "publish", url, str(tmp_path / "p2"), "--license", "MIT: or not"]), "licence id")
    for command in ("info", "verify"):  # the folder has the manifest but no shards: never taken for an empty store
        one_line_error(run_main(["store", command, out]), "is a published dataset folder", "potstill train --store")


def test_the_licence_and_provenance_of_the_manifest_reach_the_card_unchanged(tmp_path):
    url = make_store(str(tmp_path / "s.store"), "topk", "none", False)
    path = os.path.join(url, "manifest.json")
    obj = json.loads(Path(path).read_text())
    obj["provenance"] = {"license": "apache-2.0", "teacher_license": "llama3", "teacher": {
        "name": "test-teacher", "revision": "abc123", "sha256": "f" * 64}, "prompts": {
        "fingerprint": "sha256:p", "count": 14, "num_samples": 1}}
    obj["checksum"] = manifest_checksum(obj)  # as the writer that records provenance seals it
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    out = str(tmp_path / "pub")
    publish_store(open_store(url), out)  # no --license: the provenance's
    card = Path(out, "README.md").read_text()
    assert "license: apache-2.0" in card and "revision `abc123`" in card and "teacher licence: llama3" in card
    assert Path(out, "manifest.json").read_bytes() == Path(path).read_bytes()
    assert publish_store(open_store(url), str(tmp_path / "pub2"), license="mit")["license"] == "mit"  # --license wins
    rebuilt = store_from_published(out)  # training's store: the manifest, provenance included, byte for byte
    assert Path(rebuilt, "manifest.json").read_bytes() == Path(path).read_bytes()
    assert_same_records(open_store(url), open_store(rebuilt, verify_reads=True))


def test_push_is_refused_in_one_line_offline_or_logged_out_after_the_folder_is_written(tmp_path):
    url = make_store(str(tmp_path / "s.store"), "topk", "none", False)
    out = str(tmp_path / "pub")
    line = one_line_error(potstill("store", "publish", url, out, "--license", "mit", "--push", "me/targets"),
                          "--push me/targets", "offline", "hf upload me/targets")
    assert out in line and os.path.isfile(os.path.join(out, "README.md"))
    logged_out = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    one_line_error(potstill("store", "publish", url, str(tmp_path / "p2"), "--license", "mit", "--push", "me/t",
                            env=logged_out), "not logged in", "hf auth login")
    one_line_error(run_main(["store", "publish", url, str(tmp_path / "p3"), "--license", "mit", "--push", "nope"]),
                   "OWNER/NAME")


def test_a_damaged_published_file_is_named_in_one_line_and_nothing_is_cached(tmp_path):
    import hashlib

    url = make_store(str(tmp_path / "s.store"), "topk", "packed", True)
    folder = str(tmp_path / "pub")
    index = publish_store(open_store(url), folder, license="mit")
    victim = Path(folder, index["shards"][1]["hidden"])
    good = victim.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 1
    victim.write_bytes(bytes(damaged))
    key = hashlib.sha256(Path(folder, "published.json").read_bytes()).hexdigest()[:32]
    with pytest.raises(StoreError, match=f"{index['shards'][1]['hidden']}: fails its sha256 check"):
        store_from_published(folder)
    cache = tmp_path / "cache" / "published"
    assert os.listdir(cache) == [f"{key}.lock"]  # no half-built store left to be found (the lock of its rebuilds)

    # what a rebuild killed part-way left (its process gone) is removed by the next rebuild
    victim.write_bytes(good)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(cache / f"{key}.building-{int(dead.stdout)}" / "store")
    assert store_from_published(folder) == str(cache / key / "store")
    assert sorted(os.listdir(cache)) == [key, f"{key}.lock"]

    Path(folder, "published.json").write_text("not json")
    with pytest.raises(StoreError, match="published.json: not a potstill-published/1 index"):
        store_from_published(folder)


def test_hub_urls_are_parsed_and_dispatched_to_the_published_reader():
    assert hub_repo("hf://datasets/me/targets") == "me/targets"
    assert hub_repo("hf://datasets/me/targets@v1/sub") == "me/targets"
    assert hub_repo("/local/store") is None
    assert is_published("hf://datasets/me/targets")
    for bad in ("hf://models/me/x", "hf://datasets/me"):
        with pytest.raises(StoreError, match="hf://datasets/OWNER/NAME"):
            store_from_published(bad)
    # through huggingface_hub's file system: offline, a one-line error naming the URL, never a traceback
    train = potstill("train", "--store", "hf://datasets/me/targets", "--student", "x", "--out", "y")
    assert train.returncode != 0 and "Traceback" not in train.stderr, train.stderr
    phase, error = train.stderr.strip().splitlines()  # the start-up phase that failed, then the error
    assert phase.startswith("rebuild the published dataset's store ... failed"), phase
    assert error.startswith("error: hf://datasets/me/targets: cannot be read") and "offline" in error, error


# One process of several asking at once (a torchrun job's ranks) rebuilds; `_rebuild` is wrapped to count its
# calls and to last long enough for the others to ask meanwhile.
ASK_AT_ONCE = """
import os, sys, time
import potstill.store.published as published
folder, log, go = sys.argv[1:]
rebuild = published._rebuild
def counted(*args):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return rebuild(*args)
published._rebuild = counted
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
print(published.store_from_published(folder))
"""


def test_processes_asking_for_a_published_folder_at_once_rebuild_it_once(tmp_path):
    url = make_store(str(tmp_path / "s.store"), "topk", "packed", False)
    folder = str(tmp_path / "pub")
    publish_store(open_store(url), folder, license="mit")
    log, go = tmp_path / "rebuilds", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", ASK_AT_ONCE, folder, str(log), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    [path] = {out.strip() for out, _ in outs}
    assert len(log.read_text().split()) == 1  # one rebuild; the other two waited for it and use the same copy
    assert path.startswith(str(tmp_path / "cache")) and verify_store(path).ok
    assert sorted(r.id for r in open_store(path).iter_records()) == sorted(r.id for r in open_store(url).iter_records())


def test_train_reads_a_published_folder_given_as_its_store(tmp_path):
    from potstill.cli.train_cmd import _read_published
    from potstill.student_train.config import EvalConfig, TrainConfig

    url = make_store(str(tmp_path / "s.store"), "topk", "none", False)
    folder = str(tmp_path / "pub")
    publish_store(open_store(url), folder, license="mit")
    cfg = TrainConfig(store=[folder, url], hidden_from=folder)
    _read_published(cfg)
    rebuilt = store_from_published(folder)  # the same rebuilt store every time: a resumed run finds its shards
    assert cfg.stores == [rebuilt, url] and cfg.hidden_from == rebuilt
    assert rebuilt.startswith(str(tmp_path / "cache"))
    evaluation = EvalConfig(store=[folder])
    _read_published(evaluation)
    assert evaluation.stores == [rebuilt]


@pytest.mark.slow
def test_info_report_and_demo_print_the_same_byte_figures(tmp_path):
    url = make_store(str(tmp_path / "s.store"), "hybrid", "packed", True)
    store = open_store(url)
    sizes = store_sizes(store)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(url) for f in files)
    assert sizes.total == on_disk  # every byte of the store's files, each counted once
    line = sizes.describe()
    assert f"{sizes.total:,} bytes in all" in line and f"targets {sizes.targets:,}" in line
    info = potstill("store", "info", url)
    assert info.returncode == 0 and f"bytes        {line}" in info.stdout, info.stdout
    data = store_info(store)
    assert data["bytes"] == sizes.total and data["target_bytes_per_scored_token"] == round(sizes.targets / sizes.scored_tokens, 3)
    report = str(tmp_path / "r.html")
    assert potstill("store", "report", url, "--out", report).returncode == 0
    assert html.escape(line) in Path(report).read_text()
    summary = _store_summary(url)
    table = format_table({"teacher": {"params": 1, "accuracy": 1.0, "store": None},
                          "student_kd": {"params": 1, "accuracy": 0.5, "store": summary},
                          "student_baseline": {"params": 1, "accuracy": 0.5, "store": None}})
    assert line in table and f"{summary['bytes_per_token']:.0f}" in table


@pytest.mark.slow
def test_potstill_train_from_the_published_folder_matches_training_from_the_store(tmp_path, tiny_teacher_dir,
                                                                                 tiny_tokenizer_dir):
    from common import build_student
    from trainhelpers import arithmetic_items, build_teacher_store

    url = str(tmp_path / "t.store")
    build_teacher_store(url, tiny_teacher_dir, arithmetic_items(24), shard_records=8)
    folder = str(tmp_path / "pub")
    assert potstill("store", "publish", url, folder, "--license", "mit").returncode == 0
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    curves = []
    for source, out in ((url, "from-store"), (folder, "from-folder")):
        run = potstill("train", "--store", source, "--student", student, "--out", str(tmp_path / out), "--max-steps", "3",
                       "--batch-size", "2", "--eval-fraction", "0", "--report-to", "none", "--num-workers", "0",
                       "--threads", "1", "--logging-steps", "1", env={"POTSTILL_CACHE_DIR": str(tmp_path / "cache")})
        assert run.returncode == 0, run.stderr[-2000:]
        curve = json.loads(Path(tmp_path, out, "training_report.json").read_text())["loss_curve"]
        curves.append([(e["loss"], e.get("grad_norm")) for e in curve])
    assert len(curves[0]) == 3 and curves[0] == curves[1]  # the same batches, the same steps, the same losses
