"""`potstill serve` / `potstill jobs` end to end: a real uvicorn server process on 127.0.0.1 (a free
port) with the tiny local teacher, driven over HTTP and through the CLI.

One service (no token) is shared by the tests that only submit jobs; auth and kill -9 get their own.
Each may read and write the test session's temporary folder (`--data-root`). What the service
refuses (the path policy, request limits, Host check) is tested in test_serve_policy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from genhelpers import config, run_cli
from servehelpers import (
    REPO,
    TOKEN,
    Service,
    assert_complete,
    committed_ids,
    jobs_cli,
    start_service,
    submit,
    wait_job,
)

from potstill.store import open_store, verify_store
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.runner import generate
from potstill.teacher_gen.service.spec import NOT_IN_SPEC


@pytest.fixture(scope="module")
def service(tiny_teacher_dir, tmp_path_factory) -> Iterator[Service]:
    state = str(tmp_path_factory.mktemp("serve-state"))
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_TOKEN"}
    svc = start_service(tiny_teacher_dir, state, "--data-root", str(tmp_path_factory.getbasetemp()), env=env)
    yield svc
    svc.stop()


# -- jobs ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_jobs_submitted_at_once_both_complete_and_match_generate(service, tiny_teacher_dir, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(24, seed=1))
    specs = [
        {"prompts": prompts, "store": str(tmp_path / "a"), "targets": "topk", "top_k": 8, "hidden_layers": [0, -1],
         "shard_records": 5},
        {"prompts": prompts, "store": str(tmp_path / "b"), "mode": "generate", "max_new_tokens": 4,
         "sampling_temperature": 0.0},
    ]
    ids: list[str] = [""] * 2

    def post(i: int) -> None:
        with service.client() as c:
            ids[i] = submit(c, **specs[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with service.client() as c:
        finals = [wait_job(c, i) for i in ids]
    for status, spec in zip(finals, specs, strict=True):
        assert status["state"] == "done", status
        assert status["records_done"] == status["records_total"] == 24
        assert status["tokens_done"] > 0 and status["attempts"] == 1
        assert_complete(spec["store"], 24)
    assert open_store(specs[0]["store"]).manifest.targets.k == 8

    # The service's records are exactly what `potstill generate` writes with the same settings.
    direct = str(tmp_path / "direct")
    generate(config(tiny_teacher_dir, prompts, direct, top_k=8, hidden_layers=[0, -1]))
    served = {r.id: r for r in open_store(specs[0]["store"]).iter_records(with_hidden=True)}
    for ref in open_store(direct).iter_records(with_hidden=True):
        got = served[ref.id]
        np.testing.assert_array_equal(got.input_ids, ref.input_ids)
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=1e-6)
        np.testing.assert_array_equal(got.hidden[0], ref.hidden[0])


def test_cli_submit_status_list_wait(service, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=2))
    out = tmp_path / "s"
    result = jobs_cli(service, "submit", "--prompts", prompts, "--out", str(out), "--top-k", "4",
                      "--hidden-layers", "1", "--no-append-eos")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    waited = jobs_cli(service, "wait", job_id, "--poll", "0.2")
    assert waited.returncode == 0, waited.stderr
    assert f"job {job_id}: done, 6/6 records" in waited.stdout
    status = json.loads(jobs_cli(service, "status", job_id, "--json").stdout)
    assert status["state"] == "done"
    assert status["spec"]["top_k"] == 4 and status["spec"]["append_eos"] is False
    assert status["spec"]["hidden_layers"] == [1]
    listed = jobs_cli(service, "list", "--state", "done")
    assert job_id in listed.stdout and str(out) in listed.stdout
    store = open_store(str(out))
    assert store.manifest.generation["append_eos"] is False
    assert [layer.index for layer in store.manifest.hidden.layers] == [1]


def test_cancel_stops_a_running_job_between_batches_and_a_resubmit_finishes_it(service, tmp_path):
    n = 600
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(n, seed=3))
    store = str(tmp_path / "s")
    spec = {"prompts": prompts, "store": store, "batch_tokens": 64, "shard_records": 2}
    with service.client() as c:
        job_id = submit(c, **spec)
        queued_id = submit(c, prompts=prompts, store=str(tmp_path / "never"))
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["records_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.delete(f"/jobs/{queued_id}").json()["state"] == "cancelled"  # a queued job: at once
        assert c.delete(f"/jobs/{job_id}").json()["cancel_requested"] is True
        final = wait_job(c, job_id)
        assert final["state"] == "cancelled", final
        again_cli = jobs_cli(service, "cancel", job_id)  # cancelling again changes nothing
        assert again_cli.returncode == 0 and f"job {job_id}: cancelled" in again_cli.stdout, again_cli.stderr
        done = final["records_done"]
        assert 0 < done < n  # stopped in the middle; what was committed stays
        ids = committed_ids(store)
        assert len(ids) == len(set(ids)) == done
        assert verify_store(store).ok
        assert not os.path.exists(str(tmp_path / "never"))

        again = wait_job(c, submit(c, **spec))
        assert again["state"] == "done" and again["summary"]["already_done"] == done
        assert again["summary"]["records"] == n - done
        assert c.delete(f"/jobs/{again['id']}").status_code == 409  # already done
    assert_complete(store, n)


def test_an_unreadable_prompt_set_fails_its_job_and_the_service_keeps_serving(service, tmp_path):
    junk = tmp_path / "broken.parquet"
    junk.write_bytes(b"this is not a parquet file at all")
    good = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=4))
    with service.client() as c:
        bad_id = submit(c, prompts=str(junk), store=str(tmp_path / "s1"))
        good_id = submit(c, prompts=good, store=str(tmp_path / "s2"))
        bad, ok = wait_job(c, bad_id), wait_job(c, good_id)
        assert c.get("/health").json()["status"] == "ready"
    assert bad["state"] == "failed"
    assert str(junk) in bad["error"] or "broken.parquet" in bad["error"], bad["error"]
    assert ok["state"] == "done"
    result = jobs_cli(service, "wait", bad_id)
    assert result.returncode == 1 and f"error: job {bad_id} failed: " in result.stderr


def test_hostile_prompt_lines_are_skipped_and_the_job_is_done(service, tmp_path):
    """Lines that crashed a run (and so failed the whole job): a 5,000-digit integer, 100,000 nested
    brackets, a lone surrogate. Each is one skipped line with its number and reason."""
    rows = prompt_rows(2, seed=8)
    lines = [rows[0], '{"id": "big", "prompt": "a", "n": ' + "7" * 5000 + "}", "[" * 100_000,
             '{"id": "sur", "prompt": "x \\ud800", "completion": "y"}', rows[1]]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), lines)
    with service.client() as c:
        status = wait_job(c, submit(c, prompts=prompts, store=str(tmp_path / "s")))
    assert status["state"] == "done", status["error"]
    assert status["input_error_count"] == 3 and [e.split(":")[0] for e in status["input_errors"]] == [
        "line 2", "line 3", "line 4"]
    assert sorted(committed_ids(str(tmp_path / "s"))) == sorted(r["id"] for r in rows)


def test_bad_specs_get_422_naming_the_field(service, tiny_teacher_dir, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=5))
    store = str(tmp_path / "s")
    cases = [
        ({"store": store}, "prompts"),
        ({"prompts": prompts, "store": store, "top_k": "many"}, "top_k"),
        ({"prompts": prompts, "store": store, "top_k": 0}, "top_k"),
        ({"prompts": prompts, "store": store, "mode": "dream"}, "mode"),
        ({"prompts": prompts, "store": store, "hidden_layers": "all"}, "hidden_layers"),
        ({"prompts": prompts, "store": store, "colour": "blue"}, "colour"),
        ({"prompts": prompts, "store": store, "teacher": "meta-llama/Llama-3.1-70B"}, "teacher"),
        ({"prompts": prompts, "store": store, "dtype": "bfloat16"}, "dtype"),
        ({"prompts": prompts, "store": store, "trust_remote_code": True}, "trust_remote_code"),
        ({"prompts": str(tmp_path / "missing.jsonl"), "store": store}, "prompts"),
        ({"prompts": "p.jsonl", "store": store}, "prompts"),
        ({"prompts": str(tmp_path / "p.txt"), "store": store}, "prompts"),
        ({"prompts": prompts, "store": "relative/store"}, "store"),
        ({"prompts": prompts, "store": "nosuchscheme://bucket/x"}, "store"),
        ({"prompts": prompts, "store": prompts}, "store"),
        ({"prompts": prompts, "store": store, "answer_pattern": "("}, "answer_pattern"),
        ({"prompts": prompts, "store": store, "answer_pattern": "(?P<x>a)(b)"}, "answer_pattern"),
    ]
    (tmp_path / "p.txt").write_text("x")
    with service.client() as c:
        before = len(c.get("/jobs").json())
        for spec, field in cases:
            response = c.post("/jobs", json=spec)
            assert response.status_code == 422, (spec, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, str) and detail.startswith(f"{field}:"), (spec, detail)
        assert len(c.get("/jobs").json()) == before  # nothing was queued
        # Repeating the service's own teacher (or leaving it out) is fine.
        assert wait_job(c, submit(c, prompts=prompts, store=store, teacher=tiny_teacher_dir))["state"] == "done"
        assert c.get("/jobs/nosuchjob").status_code == 404
        for limit in ("1e23", str(10**23), "0", "-1"):
            response = c.get(f"/jobs?limit={limit}")
            assert response.status_code == 422, (limit, response.text)
            assert response.json()["detail"].startswith("query.limit: "), response.text
        assert "1,000,000" in c.get("/jobs?limit=" + str(10**23)).json()["detail"]
        schema = c.get("/openapi.json").json()
        fields = schema["components"]["schemas"]["JobSpec"]["properties"]
        assert set(fields) == {f for f in GenerateConfig.__dataclass_fields__ if f not in NOT_IN_SPEC}
        assert "progress" in NOT_IN_SPEC and "executor" in NOT_IN_SPEC  # (the service decides where its jobs run)
    result = jobs_cli(service, "submit", "--prompts", prompts, "--out", store, "--top-k", "0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: the service refused the job: top_k: --top-k must be at least 1, got 0"]


@pytest.mark.slow
def test_load_hundreds_of_submissions_and_polls_lose_no_job(service, tmp_path):
    """4 client threads submit 60 jobs each and poll statuses meanwhile; every job is kept and done."""
    rows = prompt_rows(4, seed=6)
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")  # one store: the first job writes it, the others find it done (top-k
    # targets: the seed, which differs between the jobs, decides only sampled ones)
    submitted: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client_thread(k: int) -> None:
        try:
            with service.client() as c:
                for i in range(60):
                    submitted[k].append(submit(c, prompts=prompts, store=store, targets="topk", seed=i))
                    polled = c.get(f"/jobs/{submitted[k][i // 2]}")
                    assert polled.status_code == 200 and polled.json()["state"] in (
                        "queued", "running", "done"), polled.text
        except Exception as e:  # surfaced below: an assert in a thread would be lost
            failures.append(repr(e))

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    ids = [i for ids in submitted for i in ids]
    assert len(ids) == len(set(ids)) == 240
    with service.client() as c:
        everything = c.get("/jobs").json()
        listed = {j["id"]: j for j in everything}
        assert set(ids) <= set(listed)
        newest = c.get("/jobs", params={"limit": 3}).json()
        assert [j["id"] for j in newest] == [j["id"] for j in everything[-3:]]
        for job_id in ids:
            assert wait_job(c, job_id)["state"] == "done"
    assert_complete(store, 4)


# -- auth ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_auth_with_a_token_every_request_needs_it(tiny_teacher_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    svc = start_service(tiny_teacher_dir, str(tmp_path / "state"), "--token-file", str(token_file),
                        "--data-root", str(tmp_path), "--max-body-bytes", "65536", token=TOKEN)
    try:
        for path in ("/health", "/jobs", "/jobs/x", "/openapi.json"):
            assert httpx.get(svc.url + path).status_code == 401
            assert httpx.get(svc.url + path, headers={"Authorization": "Bearer wrong-token-abcdefghijk"}).status_code == 401
        prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=7))
        assert httpx.post(svc.url + "/jobs", json={"prompts": prompts, "store": str(tmp_path / "x")}).status_code == 401
        assert httpx.get(svc.url + "/jobs", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
        with svc.client(TOKEN) as c:
            assert c.get("/health").json()["auth"] is True
            # With a token the Host header is not checked: clients reach the service by any name.
            assert c.get("/health", headers={"Host": "gpu-box.example:8000"}).status_code == 200
            assert c.get("/jobs").json() == []  # the refused POST queued nothing
            # A chunked body (no Content-Length) over the limit is a 413 behind the token check too.
            big = json.dumps({"prompts": prompts, "store": str(tmp_path / "x"), "rationale_template": "x" * 2**17})
            chunked = c.post("/jobs", content=iter([big[:1000].encode(), big[1000:].encode()]),
                             headers={"content-type": "application/json"})
            assert chunked.request.headers.get("transfer-encoding") == "chunked"
            assert chunked.status_code == 413 and chunked.json()["detail"].startswith("request body larger than")
        no_token = jobs_cli(svc, "list")
        assert no_token.returncode == 1 and "401" in no_token.stderr and "POTSTILL_TOKEN" in no_token.stderr
        result = jobs_cli(svc, "submit", "--prompts", prompts, "--out", str(tmp_path / "s"), "--wait", token=TOKEN)
        assert result.returncode == 0, result.stderr
        assert "done, 3/3 records" in result.stdout
        # the job's run is recorded in the store (format §10), naming the job, never the service's token
        store = tmp_path / "s"
        (record,) = [json.loads(p.read_text()) for p in (store / "runs").iterdir()]
        assert record["command"][:2] == ["potstill", "serve"] and record["command"][2].startswith("job ")
        assert record["state"] == "complete" and record["records"] == 3
        assert json.loads((store / "manifest.json").read_text())["provenance"]["prompts"]["count"] == 3
        assert not [p for p in store.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
        by_file = run_cli(["jobs", "list", "--server", svc.url, "--token-file", str(token_file)])
        assert by_file.returncode == 0 and "done" in by_file.stdout
        # the generation image's HEALTHCHECK finds the service from its command line and sends its token
        health = subprocess.run([sys.executable, os.path.join(REPO, "docker", "healthcheck.py"), str(svc.proc.pid)],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout
    finally:
        svc.stop()


def test_auth_off_on_loopback_and_a_public_bind_without_token_is_refused(service, tiny_teacher_dir, tmp_path):
    health = httpx.get(service.url + "/health").json()  # the shared service runs without a token
    assert health["auth"] is False and health["teacher"] == tiny_teacher_dir
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", tiny_teacher_dir, "--host", "0.0.0.0",
         "--state", str(tmp_path / "state")], capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: --host 0.0.0.0 accepts connections from other machines")
    assert not os.path.exists(tmp_path / "state")  # refused before touching anything


# -- crash safety -------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_during_a_job_then_restart_finishes_every_id_exactly_once(tiny_teacher_dir, tmp_path):
    n = 300
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(n, seed=8))
    store, second = str(tmp_path / "s"), str(tmp_path / "s2")
    state = str(tmp_path / "state")
    svc = start_service(tiny_teacher_dir, state, "--data-root", str(tmp_path))
    with svc.client() as c:
        job_id = submit(c, prompts=prompts, store=store, batch_tokens=64, shard_records=2, hidden_layers=[0, -1])
        queued_id = submit(c, prompts=prompts, store=second, top_k=4)
        deadline = time.monotonic() + 120
        while len(committed_ids(store) if os.path.exists(os.path.join(store, "manifest.json")) else []) < 6:
            assert time.monotonic() < deadline and svc.proc.poll() is None
            time.sleep(0.01)
    svc.proc.kill()  # SIGKILL: no shutdown code runs
    svc.proc.wait()
    done = len(committed_ids(store))
    assert 0 < done < n

    again = start_service(tiny_teacher_dir, state, "--data-root", str(tmp_path))
    try:
        with again.client() as c:
            first, queued = wait_job(c, job_id), wait_job(c, queued_id)
        assert first["state"] == "done" and first["attempts"] == 2
        assert first["summary"]["already_done"] == done and first["summary"]["records"] == n - done
        assert first["records_done"] == n
        assert queued["state"] == "done" and queued["attempts"] == 1
    finally:
        again.stop()
    assert_complete(store, n)
    assert_complete(second, n)
    assert "resuming (attempt 2)" in again.log_text()


# -- pieces without a server --------------------------------------------------------------------
def test_generate_flags_are_read_from_the_config_fields():
    from potstill.cli.jobs_cmd import parse_generate_flags
    from potstill.teacher_gen.errors import GenerateError
    from potstill.teacher_gen.service.settings import ServiceError

    got = parse_generate_flags(["--top-k", "8", "--hidden-layers=4,8,-1", "--no-append-eos", "--rationale",
                                "--compile", "--max-length", "128", "--sampling-temperature", "0.5", "--mode", "generate"])
    assert got == {"top_k": 8, "hidden_layers": [4, 8, -1], "append_eos": False, "rationale": True,
                   "compile": True, "max_length": 128, "sampling_temperature": 0.5, "mode": "generate"}
    assert parse_generate_flags(["--temperature=0.5"]) == {"sampling_temperature": 0.5}  # the old spelling
    with pytest.raises(ServiceError, match="unknown option --colour"):
        parse_generate_flags(["--colour", "blue"])
    with pytest.raises(ServiceError, match="unknown option --progress"):  # the service decides it
        parse_generate_flags(["--progress"])
    with pytest.raises(ServiceError, match="--top-k needs a value"):
        parse_generate_flags(["--top-k"])
    with pytest.raises(GenerateError, match="--top-k: expected int"):
        parse_generate_flags(["--top-k", "eight"])


def test_queue_resumes_interrupted_jobs_first_and_gives_up_after_repeated_crashes(tmp_path):
    from potstill.teacher_gen.service.jobqueue import JobQueue

    path = str(tmp_path / "jobs.sqlite")
    q = JobQueue(path)
    a, b, c = (q.add({"prompts": name}, "t") for name in "abc")
    assert q.claim_next(3).id == a.id
    assert q.request_cancel(c.id).state == "cancelled"  # queued: at once
    for crashes in (1, 2):  # the service dies while running `a`; a new one opens the same file
        q.close()
        q = JobQueue(path)
        job = q.claim_next(3)
        assert (job.id, job.attempts, job.crashes) == (a.id, crashes + 1, crashes)
    q.mark_stopped_cleanly(a.id)  # an orderly shutdown is not a crash
    q.close()
    q = JobQueue(path)
    assert (q.claim_next(3).id, q.get(a.id).crashes) == (a.id, 2)
    q.close()
    q = JobQueue(path)
    assert q.claim_next(3).id == b.id  # `a` died a third time: failed, not retried
    failed = q.get(a.id)
    assert failed.state == "failed" and "died 3 times" in failed.error
    assert q.request_cancel(b.id).cancel_requested and q.get(b.id).state == "running"
    assert q.counts() == {"queued": 0, "running": 1, "done": 0, "failed": 1, "cancelled": 1}
    q.close()


def test_a_file_url_is_a_local_path_under_the_roots(service, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(5, seed=9))
    with service.client() as c:
        ok = wait_job(c, submit(c, prompts=f"file://{prompts}", store=f"file://{tmp_path}/s"))
        missing = c.post("/jobs", json={"prompts": f"file://{tmp_path}/gone.jsonl", "store": str(tmp_path / "s2")})
    assert ok["state"] == "done" and ok["records_done"] == 5
    assert_complete(str(tmp_path / "s"), 5)
    assert missing.status_code == 422
    assert missing.json()["detail"] == f"prompts: file://{tmp_path}/gone.jsonl does not exist on the server"
    inputs = os.path.join(service.state, "inputs")
    assert not os.path.exists(inputs) or not os.listdir(inputs)  # read in place, not copied
