"""Provenance and completeness of a store (format §10): the manifest's `provenance`, the run records in
`runs/`, `store info`'s "N of M records committed" and the shares that never ran, `verify --complete`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from genhelpers import config, run_cli, run_main
from storehelpers import committed_ids

from potstill.store import Store, copy_store, verify_store
from potstill.store.provenance import (
    RUNS,
    item_id,
    read_runs,
    redact_command,
    share_of,
    shares_of_keys,
    store_job_status,
)
from potstill.teacher_gen.provenance import card_license, teacher_license
from potstill.teacher_gen.runner import generate, owner

N = 12
SECRET = "hf_SeCrEtToKeN0123456789"


def _args(teacher: str, prompts: str, store: str, *extra: str) -> list[str]:
    return ["generate", "--teacher", teacher, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--targets", "topk", "--top-k", "4", "--codec", "none", "--shard-records", "4", "--no-progress", *extra]


def _runs(store: str) -> list[dict]:
    """The store's run records, oldest first."""
    runs = [json.loads(Path(store, RUNS, n).read_text()) for n in os.listdir(os.path.join(store, RUNS))]
    return sorted(runs, key=lambda r: r["started"])


def _every_file(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


# -- the hash of a share, and its vectorised form -----------------------------------------------------
def test_shares_from_stored_keys_equal_the_runners_owner():
    from potstill.store.ids import id_keys

    ids = [f"r{i}" for i in range(2000)] + ["ü-é", "a#b", ""]
    for workers in (1, 2, 3, 7, 64):
        expected = np.array([owner(i, workers) for i in ids])
        assert np.array_equal(shares_of_keys(id_keys(ids), workers), expected)
        assert [share_of(i, workers) for i in ids] == expected.tolist()
    assert item_id("p1#3", 4) == "p1" and item_id("a#b", 1) == "a#b" and item_id("a#b#0", 2) == "a#b"


def test_a_command_line_is_recorded_without_its_secrets():
    argv = ["potstill", "generate", "--token", SECRET, "--token-file=/run/secret", "--max-new-tokens", "8",
            "--prompts", f"https://user:{SECRET}@example.com/p.jsonl?token={SECRET}&split=a",
            "--hidden-chunk-tokens", "16", "--api-key", SECRET]
    shown = redact_command(argv)
    assert SECRET not in " ".join(shown) and "/run/secret" not in " ".join(shown)
    assert shown[shown.index("--max-new-tokens") + 1] == "8"  # a count of tokens is no token
    assert shown[shown.index("--hidden-chunk-tokens") + 1] == "16"
    assert "example.com/p.jsonl" in shown[shown.index("--prompts") + 1]
    assert "split=a" in shown[shown.index("--prompts") + 1]


def test_the_teachers_licence_is_read_from_its_model_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# model\n")
    assert card_license(str(card)) == "apache-2.0"
    card.write_text("---\nlicense: other\nlicense_name: llama3\n---\n")
    assert card_license(str(card)) == "other (llama3)"
    card.write_text("# no front matter\nlicense: mit\n")
    assert card_license(str(card)) is None


def test_a_gguf_teachers_license_is_read_past_the_values_before_it(tmp_path):
    """The header is walked entry by entry (every value type, arrays of strings and of arrays) up to
    `general.license`; the `gguf` package's own reader agrees on every string entry."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from potstill.teacher_gen.gguf import metadata_string

    path = str(tmp_path / "m.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_uint8("a.u8", 7)
    writer.add_int64("a.i64", -5)
    writer.add_float64("a.f64", 0.5)
    writer.add_bool("a.bool", True)
    writer.add_string("a.name", "tiny ü")
    writer.add_array("a.tokens", ["<s>", "", "héllo"])
    writer.add_array("a.ids", [1, 2, 3])
    writer.add_array("a.nested", [["x", "yz"], [1.5]])
    writer.add_key_value("general.license", "apache-2.0", GGUFValueType.STRING)
    writer.add_array("a.after", ["z"])
    writer.add_tensor("w", np.zeros((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fields = GGUFReader(path).fields
    for key, field in fields.items():
        if field.types == [GGUFValueType.STRING]:
            assert metadata_string(path, key) == bytes(field.parts[field.data[0]]).decode(), key
    assert metadata_string(path, "general.license") == "apache-2.0" == teacher_license(path)
    assert metadata_string(path, "a.ids") is None and metadata_string(path, "no.such.key") is None
    Path(path).write_bytes(b"GGUF" + bytes(8))  # cut short: no licence, not an error
    assert teacher_license(path) is None
    Path(path).write_bytes(b"")
    assert teacher_license(path) is None


# -- provenance through generate, copy and resume ------------------------------------------------------
@pytest.mark.slow
def test_provenance_is_written_kept_by_copy_and_resume_and_holds_no_secret(tmp_path, tiny_teacher_dir):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_teacher_dir, teacher)
    with open(os.path.join(teacher, "README.md"), "w") as f:
        f.write("---\nlicense: mit\n---\n")
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(N, seed=3))
    store = str(tmp_path / "s")
    env = {"HF_TOKEN": SECRET}
    first = run_cli([*_args(teacher, prompts, store, "--license", "cc-by-4.0"), "--max-errors", "5"], env=env)
    assert first.returncode == 0, first.stderr

    manifest = json.loads(Path(store, "manifest.json").read_text())
    p = manifest["provenance"]
    assert p["license"] == "cc-by-4.0" and p["teacher_license"] == "mit"
    # a local teacher by its files' sizes and times (what loading it reads), not a hash of its weights
    assert p["teacher"]["name"] == teacher and p["teacher"]["sha256"] is None
    assert p["teacher"]["files"] == [{"path": n, "bytes": os.stat(os.path.join(teacher, n)).st_size,
                                      "mtime_ns": os.stat(os.path.join(teacher, n)).st_mtime_ns}
                                     for n in sorted(os.listdir(teacher))]
    assert p["prompts"] == {"fingerprint": "sha256:" + hashlib.sha256(Path(prompts).read_bytes()).hexdigest(),
                            "count": N, "num_samples": 1}
    assert p["tokenizer_sha256"] == manifest["tokenizer"]["fingerprint"]
    assert p["settings"]["top_k"] == 4 and p["potstill_version"] and p["created"]
    [run] = _runs(store)
    assert run["state"] == "complete" and run["records"] == N and run["ended"] >= run["started"]
    assert run["command"][run["command"].index("--license") + 1] == "cc-by-4.0"
    assert run["hardware"]["cpu_cores"] >= 1 and run["prompts"]["per_share"] == [N]

    # a resume with the same settings (a different batch size, no --license) is no other store
    again = run_cli(_args(teacher, prompts, store, "--batch-tokens", "32"), env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(Path(store, "manifest.json").read_text())["provenance"] == p
    assert [r["state"] for r in _runs(store)] == ["complete", "complete"]
    assert _runs(store)[1]["already_done"] == N and _runs(store)[1]["records"] == 0

    copy = str(tmp_path / "copy")
    copy_store(store, copy)
    assert json.loads(Path(copy, "manifest.json").read_text())["provenance"] == p
    assert sorted(os.listdir(os.path.join(copy, RUNS))) == sorted(os.listdir(os.path.join(store, RUNS)))
    assert verify_store(copy).ok

    for root in (store, copy):
        for path in _every_file(root):
            assert SECRET.encode() not in Path(path).read_bytes(), path

    info = run_cli(["store", "info", copy])
    assert info.returncode == 0, info.stderr
    assert f"teacher {teacher} (local, {len(os.listdir(teacher))} files)" in info.stdout
    assert "licence      cc-by-4.0; the teacher's: mit" in info.stdout
    assert f"{N} of {N} records committed" in info.stdout and "complete" in info.stdout


@pytest.mark.slow
def test_hash_teacher_records_the_sha256_of_a_local_teachers_files(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=3))
    store = str(tmp_path / "s")
    proc = run_cli([*_args(tiny_teacher_dir, prompts, store), "--hash-teacher"])
    assert proc.returncode == 0, proc.stderr
    teacher = json.loads(Path(store, "manifest.json").read_text())["provenance"]["teacher"]
    lines = []  # format §10.1: `<relative path> sha256:<hex>` per file, in path order
    for root, dirs, files in os.walk(tiny_teacher_dir):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            rel = os.path.relpath(full, tiny_teacher_dir).replace(os.sep, "/")
            lines.append(f"{rel} sha256:{hashlib.sha256(Path(full).read_bytes()).hexdigest()}\n")
    assert teacher["sha256"] == "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()
    assert [f["path"] for f in teacher["files"]] == sorted(os.listdir(tiny_teacher_dir))


def test_a_killed_run_is_resumed_and_both_runs_are_recorded(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(N, seed=4))
    store = str(tmp_path / "s")
    calls = {"n": 0}

    def stop_after_first_batch() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    cfg = config(tiny_teacher_dir, prompts, store, shard_records=2, batch_tokens=32)
    first = generate(cfg, should_stop=stop_after_first_batch)
    assert first.stopped and 0 < first.records < N
    [run] = _runs(store)
    assert run["state"] == "stopped" and run["records"] == first.records
    status, _ = store_job_status(Store(store))
    assert (status.committed, status.expected, status.complete) == (first.records, N, False)
    assert status.shares[0].state == "behind"

    second = generate(config(tiny_teacher_dir, prompts, store, shard_records=2))
    assert second.records == N - first.records
    assert [r["state"] for r in _runs(store)] == ["stopped", "complete"]
    status, _ = store_job_status(Store(store))
    assert status.complete and status.committed == status.expected == N
    assert Store(store).manifest.provenance["prompts"]["count"] == N


def test_a_failed_run_is_recorded_with_its_error_and_releases_its_share(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(N, seed=4))
    store = str(tmp_path / "s")
    calls = {"n": 0}

    def fail_after_first_batch() -> bool:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("the teacher's node went away")
        return False

    with pytest.raises(RuntimeError, match="node went away"):
        generate(config(tiny_teacher_dir, prompts, store, shard_records=2, batch_tokens=32), should_stop=fail_after_first_batch)
    [run] = _runs(store)
    committed = len(committed_ids(store))
    assert run["state"] == "failed" and "node went away" in run["error"] and run["records"] == committed
    # its claim on the share was released: a rerun is not refused as overlapping a live run
    second = generate(config(tiny_teacher_dir, prompts, store, shard_records=2))
    assert second.records == N - committed
    assert [r["state"] for r in _runs(store)] == ["failed", "complete"]


# -- completeness of a --workers job -------------------------------------------------------------------
@pytest.mark.slow
def test_a_share_that_never_ran_is_named_until_it_runs(tmp_path, tiny_teacher_dir):
    rows = [*prompt_rows(N, seed=5), {"id": "bad"}]  # one invalid row: no prompt
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    per_share = [sum(owner(r["id"], 2) == i for r in rows[:N]) for i in range(2)]
    assert min(per_share) > 0

    # (generate and verify's exit 1 as processes; the other commands through the same entry point here)
    ran = run_cli(_args(tiny_teacher_dir, prompts, store, "--workers", "2", "--worker-index", "0"))
    assert ran.returncode == 0, ran.stderr
    info = run_main(["store", "info", store])
    assert info.returncode == 0, info.stderr
    assert f"{per_share[0]} of {N} records committed" in info.stdout
    assert f"share 1: 0 of {per_share[1]} records committed (never ran)" in info.stdout
    data = json.loads(run_main(["store", "info", store, "--json"]).stdout)
    assert [s["state"] for s in data["job"]["shares"]] == ["complete", "never ran"]

    plain = run_main(["store", "verify", store])
    assert plain.returncode == 0, plain.stdout + plain.stderr  # incomplete is not damage
    incomplete = run_cli(["store", "verify", store, "--complete"])
    assert incomplete.returncode == 1
    assert "MISSING     share 1: 0 of" in incomplete.stdout and "(never ran)" in incomplete.stdout
    assert verify_store(store).ok

    rest = run_main(_args(tiny_teacher_dir, prompts, store, "--workers", "2", "--worker-index", "1"))
    assert rest.returncode == 0, rest.stderr
    done = run_main(["store", "verify", store, "--complete"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{N} of {N} records committed" in done.stdout and "MISSING" not in done.stdout


def test_adding_prompts_makes_the_job_the_larger_set(tmp_path, tiny_teacher_dir, capsys):
    rows = prompt_rows(N + 6, seed=10)
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows[:N])
    store = str(tmp_path / "s")
    for i in range(2):
        generate(config(tiny_teacher_dir, prompts, store, workers=2, worker_index=i))
    status, _ = store_job_status(Store(store))
    assert status.complete and status.expected == N
    capsys.readouterr()

    write_jsonl(prompts, rows)  # the user adds 6 prompts and runs share 0 again: allowed, with a note
    generate(config(tiny_teacher_dir, prompts, store, workers=2, worker_index=0))
    assert f"({N} prompts then, {N + 6} now)" in capsys.readouterr().err
    status, _ = store_job_status(Store(store))
    assert status.prompts["count"] == N + 6 and status.expected == N + 6
    assert [s.state for s in status.shares] == ["complete", "never ran"]  # share 1 ran only on the old set
    generate(config(tiny_teacher_dir, prompts, store, workers=2, worker_index=1))
    status, _ = store_job_status(Store(store))
    assert status.complete and status.committed == N + 6
    # the manifest keeps the prompt set the store was created with
    assert Store(store).manifest.provenance["prompts"]["count"] == N


def test_records_skipped_as_too_long_are_not_expected(tmp_path, tiny_teacher_dir):
    rows = prompt_rows(N, seed=6)
    rows[3]["prompt"] = " ".join(["word"] * 400)  # longer than --max-length: skipped, not missing
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    summary = generate(config(tiny_teacher_dir, prompts, store, max_length=64))
    assert summary.records == N - 1
    status, _ = store_job_status(Store(store))
    assert (status.committed, status.expected, status.complete) == (N - 1, N - 1, True)
    assert "less 1 skipped as invalid or too long" in status.lines()[0]


def test_samples_count_per_prompt(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=7, completion=False))
    store = str(tmp_path / "s")
    cfg = config(tiny_teacher_dir, prompts, store, mode="generate", num_samples=3, max_new_tokens=3, workers=2,
                 worker_index=0)
    generate(cfg)
    status, _ = store_job_status(Store(store))
    mine = sum(owner(f"r{i:04d}", 2) == 0 for i in range(4))
    assert status.shares[0].committed == status.shares[0].expected == 3 * mine
    assert status.shares[1].state == "never ran" and status.expected == 12


# -- old stores, and run files that cannot be read -----------------------------------------------------
def test_an_old_store_without_provenance_still_verifies_and_shows(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=8))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store))
    # what a store of an earlier potstill is: no provenance in its manifest, no runs/ folder
    path = os.path.join(store, "manifest.json")
    from potstill.store.manifest import CHECKSUM_KEY, manifest_checksum

    obj = json.loads(Path(path).read_text())
    del obj["provenance"]
    obj[CHECKSUM_KEY] = manifest_checksum(obj)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
    shutil.rmtree(os.path.join(store, RUNS))

    assert verify_store(store).ok
    info = run_main(["store", "info", store])
    assert info.returncode == 0, info.stderr
    assert "provenance" not in info.stdout and "records committed" not in info.stdout
    assert run_main(["store", "verify", store]).returncode == 0
    unknown = run_cli(["store", "verify", store, "--complete"])
    assert unknown.returncode == 1 and "no run records" in unknown.stdout
    copy_store(store, str(tmp_path / "copy"))
    assert verify_store(str(tmp_path / "copy")).ok


def test_a_run_records_write_cut_short_is_a_leftover_clean_removes(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=11))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store))
    dead = 2**22 + 17  # above any pid this machine hands out
    temp = Path(store, RUNS, f".g000-dead.20260101T000000000000Z.json.{dead}-00ff00ff.tmp")
    temp.write_text("{")
    report = verify_store(store)
    assert report.ok and [x.path for x in report.leftovers] == [f"{RUNS}/{temp.name}"]
    assert not report.run_warnings  # a temporary file is no run record
    assert verify_store(store, clean=True).cleaned == [f"{RUNS}/{temp.name}"] and not temp.exists()
    assert len(read_runs(Store(store).fs, store).runs) == 1


@pytest.mark.parametrize("body", [b"{not json", b'{"format": "potstill-run"}', b"[1, 2]"])
def test_a_malformed_run_file_is_a_warning_not_damage(tmp_path, tiny_teacher_dir, body):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=9))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store))
    bad = os.path.join(store, RUNS, "g999-x.20260101T000000000000Z.json")
    Path(bad).write_bytes(body)
    Path(store, RUNS, "notes.txt").write_text("x")
    report = verify_store(store, clean=True)
    assert report.ok and not report.leftovers and os.path.exists(bad)
    assert any("g999-x" in w for w in report.run_warnings)
    assert report.job is not None and report.job.complete  # the sound run still tells
    assert len(read_runs(Store(store).fs, store).runs) == 1
    out = run_cli(["store", "verify", store, "--complete"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning" in out.stderr and "g999-x" in out.stderr
