"""The generation service as a trust boundary: a token holder reads and writes only where the operator
said (the path policy), cannot make the service buffer unbounded bodies or capture more than the
vocabulary, and a web page cannot reach a token-less service through DNS rebinding.

A sandbox holds a data root and, next to it, a credentials file no job may read. The policy is
tested on its own, through the real FastAPI app in process (submission and the run-time re-check,
with the real job thread), and through a real uvicorn process (body limit, Host check, fetching
from an allowed URL scheme).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import httpx
import pytest
from common import prompt_rows, write_jsonl
from servehelpers import REPO, Service, assert_complete, start_service, submit, wait_job

from potstill.teacher_gen.service.paths import PathPolicy
from potstill.teacher_gen.service.settings import ServeConfig, ServiceError, SpecError

SECRET = "AKIA-SECRET-0f9e8d7c6b5a"


@dataclass
class Sandbox:
    base: str
    root: str  # the data root
    prompts: str  # a good prompt set inside the root
    outside: str  # a folder next to the root
    secret: str  # outside/credentials.jsonl


def make_sandbox(base: str) -> Sandbox:
    root, outside = os.path.join(base, "data"), os.path.join(base, "private")
    os.makedirs(root)
    os.makedirs(outside)
    secret = write_jsonl(os.path.join(outside, "credentials.jsonl"), [
        {"id": SECRET, "aws_secret_access_key": SECRET}, {"user": "admin", "password": SECRET, "prompt": SECRET},
    ])
    os.symlink(secret, os.path.join(root, "creds.jsonl"))  # a symlink inside the root, pointing out
    os.symlink(outside, os.path.join(root, "private"))
    prompts = write_jsonl(os.path.join(root, "p.jsonl"), prompt_rows(3, seed=11))
    return Sandbox(base, root, prompts, outside, secret)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    return make_sandbox(str(tmp_path_factory.mktemp("policy")))


def policy(state: str, **settings) -> PathPolicy:
    return PathPolicy.from_settings(ServeConfig(teacher="t", state=state, **settings))


def attacks(s: Sandbox) -> list[tuple[dict, str]]:
    """(job spec, the field it must be refused on): each tries to read the secret or write outside."""
    return [
        ({"prompts": s.secret, "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"{s.root}/../private/credentials.jsonl", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"{s.root}/creds.jsonl", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"{s.root}/private/credentials.jsonl", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"file://{s.secret}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"file://localhost{s.secret}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"file://{s.outside}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"FILE://{s.secret}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"local://{s.secret}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"simplecache::file://{s.secret}", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": f"{s.prompts}::zip://x", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": "https://example.invalid/p.jsonl", "store": f"{s.root}/a"}, "prompts"),
        ({"prompts": s.prompts, "store": f"{s.outside}/x"}, "store"),
        ({"prompts": s.prompts, "store": f"{s.root}/../private/x"}, "store"),
        ({"prompts": s.prompts, "store": f"{s.root}/private/x"}, "store"),
        ({"prompts": s.prompts, "store": f"file://{s.outside}/x"}, "store"),
        ({"prompts": s.prompts, "store": "s3://bucket/x"}, "store"),
    ]


# -- the policy on its own --------------------------------------------------------------------------
def test_paths_inside_the_roots_are_accepted_and_resolved(sandbox, tmp_path):
    reads, writes = tmp_path / "reads", tmp_path / "writes"
    reads.mkdir()
    writes.mkdir()
    os.symlink(sandbox.prompts, reads / "alias.jsonl")  # a symlink that stays inside the roots
    p = policy(str(tmp_path / "state"), data_root=[sandbox.root], read_root=[str(reads)], write_root=[str(writes)])
    assert p.prompts(sandbox.prompts) == os.path.realpath(sandbox.prompts)
    assert p.prompts(f"file://{sandbox.prompts}") == os.path.realpath(sandbox.prompts)
    assert p.prompts(f"{sandbox.root}/sub/../p.jsonl") == os.path.realpath(sandbox.prompts)
    assert p.prompts(str(reads / "alias.jsonl")) == os.path.realpath(sandbox.prompts)
    assert p.store(f"{sandbox.root}/new/run.store") == os.path.realpath(sandbox.root) + "/new/run.store"
    assert p.store(str(writes / "s")) == os.path.realpath(writes / "s")
    assert p.prompts(str(writes / "s")) == os.path.realpath(writes / "s")  # a store may be read back
    with pytest.raises(SpecError, match=r"^store: .*/reads/s is outside the folders this service may write"):
        p.store(str(reads / "s"))  # a read root is not writable
    assert p.describe() == {"read_roots": [sandbox.root, str(writes), str(reads)],
                            "write_roots": [sandbox.root, str(writes)], "url_schemes": []}


def test_escapes_and_unlisted_schemes_are_refused_without_reading(sandbox, tmp_path):
    p = policy(str(tmp_path / "state"), data_root=[sandbox.root], allow_url_scheme=["http"])
    for spec, field in attacks(sandbox):
        with pytest.raises(SpecError) as refused:
            p.prompts(spec["prompts"])
            p.store(spec["store"])
        assert refused.value.field == field, spec
        assert SECRET not in str(refused.value)
    assert p.prompts("http://data.example/p.jsonl") == "http://data.example/p.jsonl"  # allowed: kept as is
    with pytest.raises(SpecError, match=r"chained URLs \('::'\) are not accepted"):
        p.prompts(f"http://data.example/p.jsonl::file://{sandbox.secret}")  # an allowed scheme, chained to the disk
    messages = {
        f"{sandbox.root}/../private/credentials.jsonl":
            f"prompts: {sandbox.root}/../private/credentials.jsonl is outside the folders this service may read "
            f"({sandbox.root})",
        f"{sandbox.root}/creds.jsonl":
            f"prompts: {sandbox.root}/creds.jsonl leads outside the folders this service may read ({sandbox.root}) "
            "through a symlink",
        "https://example.invalid/p.jsonl":
            "prompts: 'https://example.invalid/p.jsonl': this service does not open https:// URLs (allowed: http; "
            "the operator allows a scheme with --allow-url-scheme)",
        f"file://other-host{sandbox.secret}":
            f"prompts: 'file://other-host{sandbox.secret}': a file:// URL must name a path on this server "
            "(file:///path)",
        "data/p.jsonl": "prompts: 'data/p.jsonl' is a relative path; give an absolute path on the server, inside "
                        f"{sandbox.root}",
    }
    for location, message in messages.items():
        with pytest.raises(SpecError) as refused:
            p.prompts(location)
        assert str(refused.value) == message


def test_without_roots_no_local_path_is_accepted(sandbox, tmp_path):
    p = policy(str(tmp_path / "state"))
    with pytest.raises(SpecError, match=r"^prompts: this service reads no local paths: it was started without "
                                        r"--data-root or --read-root$"):
        p.prompts(sandbox.prompts)
    with pytest.raises(SpecError, match=r"^store: this service writes no local paths: it was started without "
                                        r"--data-root or --write-root$"):
        p.store(f"file://{sandbox.root}/s")
    only_read = policy(str(tmp_path / "state"), read_root=[sandbox.root])
    assert only_read.prompts(sandbox.prompts)
    with pytest.raises(SpecError, match="writes no local paths"):
        only_read.store(f"{sandbox.root}/s")


def test_the_services_own_files_are_never_a_jobs_prompts_or_store(tmp_path):
    root = tmp_path / "srv"
    state = root / "state"
    state.mkdir(parents=True)
    (state / "jobs.sqlite").write_text("other users' jobs")
    token = root / "token.jsonl"
    token.write_text(json.dumps({"prompt": SECRET}) + "\n")
    p = policy(str(state), data_root=[str(root)], token_file=str(token))
    for location, field in [(str(state / "jobs.sqlite"), "prompts"), (str(token), "prompts"), (str(root), "prompts"),
                            (str(state / "x"), "store"), (str(root), "store"), (f"{root}/./state", "store")]:
        with pytest.raises(SpecError, match=r"is or holds the service's own files") as refused:
            p.prompts(location) if field == "prompts" else p.store(location)
        assert refused.value.field == field
    assert p.store(str(root / "run.store")).endswith("/srv/run.store")  # beside them is fine


def test_a_prompt_folder_holding_a_symlink_out_is_refused(sandbox, tmp_path):
    root = tmp_path / "data"
    folder = root / "ds"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}")
    p = policy(str(tmp_path / "state"), data_root=[str(root)])
    assert p.prompts(str(folder)) == os.path.realpath(folder)
    os.symlink(sandbox.secret, folder / "data-00000-of-00001.arrow")
    with pytest.raises(SpecError, match=r"ds: data-00000-of-00001.arrow is a symlink leading outside"):
        p.prompts(str(folder))


@pytest.mark.parametrize("settings, message", [
    ({"data_root": ["/no/such/folder"]}, "--data-root /no/such/folder: no such folder"),
    ({"read_root": ["relative/folder"]}, "--read-root relative/folder: give an absolute path"),
    ({"allow_url_scheme": ["file"]}, "--allow-url-scheme file: file:// reaches the local disk"),
    ({"allow_url_scheme": ["local"]}, "--allow-url-scheme local: local:// reaches the local disk"),
    ({"allow_url_scheme": ["simplecache"]}, "--allow-url-scheme simplecache: simplecache:// reaches the local disk"),
    ({"allow_url_scheme": ["zip"]}, "--allow-url-scheme zip: zip:// reaches the local disk"),
    ({"allow_url_scheme": ["nosuchscheme"]}, "--allow-url-scheme nosuchscheme: the service cannot open"),
])
def test_bad_roots_and_unsafe_schemes_stop_the_service_at_start(tmp_path, settings, message):
    with pytest.raises(ServiceError) as refused:
        policy(str(tmp_path / "state"), **settings)
    assert str(refused.value).startswith(message)


@pytest.mark.slow
def test_serve_refuses_a_missing_root_in_one_line_before_writing_anything(tiny_teacher_dir, tmp_path):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_TOKEN"}
    for flags, line in [(["--data-root", str(tmp_path / "nope")], f"error: --data-root {tmp_path}/nope: no such folder"),
                        (["--allow-url-scheme", "FILE://"], "error: --allow-url-scheme file: file:// reaches the local "
                                                            "disk or wraps another filesystem; local paths (and "
                                                            "file:// URLs) follow the roots instead")]:
        result = subprocess.run([sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", tiny_teacher_dir,
                                 "--state", str(state), *flags], capture_output=True, text=True, env=env, cwd=REPO,
                                timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [line]
        assert not state.exists()
    state_file = tmp_path / "state.txt"
    state_file.write_text("not a folder")
    for state_flag, line in [(state_file, f"error: --state {state_file}: exists and is not a folder (the service "
                                          "keeps its queue in it)"),
                             (state_file / "sub", f"error: --state {state_file}/sub: cannot create the state folder "
                                                  "(Not a directory)")]:
        result = subprocess.run([sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", tiny_teacher_dir,
                                 "--state", str(state_flag)], capture_output=True, text=True, env=env, cwd=REPO,
                                timeout=120)
        assert (result.returncode, result.stderr.strip().splitlines()) == (1, [line])
    assert state_file.read_text() == "not a folder"


def test_roots_and_schemes_come_from_the_config_file_too(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "serve.yaml"
    path.write_text(f"serve:\n  teacher: t\n  data_root: {tmp_path}/d\n  write-root: [{tmp_path}]\n"
                    "  allow_url_scheme: [S3]\n  allow_host: gpu-box.internal\n  max_body_bytes: 65536\n")
    settings = ServeConfig.build(str(path), allow_host=["other.internal"])
    assert settings.data_root == [f"{tmp_path}/d"] and settings.write_root == [str(tmp_path)]
    assert settings.allow_url_scheme == ["s3"] and settings.max_body_bytes == 65536
    assert settings.allow_host == ["other.internal"]  # a flag replaces the file's list
    path.write_text("teacher: t\ndata_root: {a: 1}\n")
    with pytest.raises(ServiceError, match=r"--data-root: expected a string or a list of strings"):
        ServeConfig.build(str(path))
    with pytest.raises(ServiceError, match=r"--max-body-bytes must be at least 1024"):
        ServeConfig.build(teacher="t", max_body_bytes=10)


# -- the app, in process ----------------------------------------------------------------------------
@dataclass
class InProcess:
    client: object  # a starlette TestClient on http://127.0.0.1
    runner: object  # the JobRunner, not started until a test starts it
    queue: object
    vocab_size: int


@pytest.fixture
def in_process(tiny_teacher_dir, tmp_path) -> Iterator[callable]:
    """Build the service's app as `serve` does, without a socket; its job thread starts on demand."""
    from starlette.testclient import TestClient

    from potstill.teacher_gen.service.app import Service, create_app
    from potstill.teacher_gen.service.jobqueue import JobQueue
    from potstill.teacher_gen.service.worker import JobRunner, ServiceTeacher

    opened: list[InProcess] = []

    def build(**overrides) -> InProcess:
        settings = ServeConfig.build(teacher=tiny_teacher_dir, device="cpu", state=str(tmp_path / "state"), **overrides)
        teacher = ServiceTeacher(settings)
        teacher.check()
        queue = JobQueue(str(tmp_path / "jobs.sqlite"))
        rules = PathPolicy.from_settings(settings)
        runner = JobRunner(queue, settings, rules, teacher, str(tmp_path / "state" / "inputs"))
        app = create_app(Service(settings, queue, runner, None, rules))
        made = InProcess(TestClient(app, base_url="http://127.0.0.1"), runner, queue, teacher.spec.vocab_size)
        opened.append(made)
        return made

    yield build
    for made in opened:
        made.runner.shutdown(60)
        made.queue.close()


def test_submission_refuses_every_escape_without_echoing_the_file(in_process, tmp_path):
    s = make_sandbox(str(tmp_path / "box"))
    app = in_process(data_root=[s.root])
    for spec, field in attacks(s):
        response = app.client.post("/jobs", json=spec)
        assert response.status_code == 422, (spec, response.text)
        assert response.json()["detail"].startswith(f"{field}: "), (spec, response.text)
        assert SECRET not in response.text
    assert app.client.get("/jobs").json() == []  # nothing was queued
    assert not os.path.exists(f"{s.outside}/x") and sorted(os.listdir(s.outside)) == ["credentials.jsonl"]
    assert app.client.post("/jobs", json={"prompts": s.prompts, "store": f"{s.root}/ok"}).status_code == 201
    health = app.client.get("/health").json()
    assert (health["read_roots"], health["write_roots"], health["url_schemes"]) == ([s.root], [s.root], [])


def test_a_service_without_roots_names_the_flag(in_process, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=12))
    app = in_process()
    response = app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s")})
    assert response.status_code == 422
    assert response.json() == {"detail": "prompts: this service reads no local paths: it was started without "
                                         "--data-root or --read-root"}


def test_top_k_is_capped_at_the_teachers_vocabulary(in_process, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=13))
    app = in_process(data_root=[str(tmp_path)])
    vocab = app.vocab_size
    too_many = app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "top_k": vocab + 1})
    assert too_many.status_code == 422
    assert too_many.json() == {"detail": f"top_k: {vocab + 1} is above the teacher's vocabulary size {vocab}"}
    huge = app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "top_k": 10**8})
    assert huge.status_code == 422 and huge.json()["detail"].startswith("top_k: ")
    assert app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "top_k": vocab}).status_code == 201
    bad_writer = app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "writer_id": "../x"})
    assert bad_writer.status_code == 422 and bad_writer.json()["detail"].startswith("writer_id: invalid writer id")


def test_max_top_k_caps_a_jobs_top_k_on_any_backend(in_process, tmp_path):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=13))
    app = in_process(data_root=[str(tmp_path)], max_top_k=16)
    above = app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "top_k": 17})
    assert above.status_code == 422
    assert above.json() == {"detail": "top_k: 17 is above this service's --max-top-k 16"}
    assert app.client.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "s"), "top_k": 16}).status_code == 201
    with pytest.raises(ServiceError, match="--max-top-k must be at least 1"):
        ServeConfig.build(teacher="t", max_top_k=0)


def test_paths_are_checked_again_when_the_job_runs(in_process, tmp_path):
    """Files change between submission and run, and a restart may narrow the roots: a job that would
    now leave the roots fails with the policy's reason, and reads or writes nothing outside."""
    s = make_sandbox(str(tmp_path / "box"))
    swapped = write_jsonl(f"{s.root}/later.jsonl", prompt_rows(3, seed=14))
    os.makedirs(f"{s.root}/out")
    app = in_process(data_root=[s.root])
    client = app.client
    prompts_swap = submit(client, prompts=swapped, store=f"{s.root}/s1")
    store_swap = submit(client, prompts=s.prompts, store=f"{s.root}/out/s2")
    # Accepted by an earlier service with wider roots (restarted since with only the data root).
    earlier = app.queue.add({"prompts": s.secret, "store": f"{s.root}/s3"}, app.runner.settings.teacher).id
    good = submit(client, prompts=s.prompts, store=f"{s.root}/s4")

    os.remove(swapped)
    os.symlink(s.secret, swapped)  # the accepted prompt file now points at the credentials
    shutil.rmtree(f"{s.root}/out")
    os.symlink(s.outside, f"{s.root}/out")  # the accepted store's folder now leads outside
    app.runner.start()
    finals = {job_id: wait_job(client, job_id) for job_id in (prompts_swap, store_swap, earlier, good)}

    assert finals[prompts_swap]["error"] == (f"prompts: {swapped} leads outside the folders this service may read "
                                             f"({s.root}) through a symlink")
    assert finals[store_swap]["error"] == (f"store: {s.root}/out/s2 leads outside the folders this service may "
                                           f"write ({s.root}) through a symlink")
    assert finals[earlier]["error"] == (f"prompts: {s.secret} is outside the folders this service may read "
                                        f"({s.root})")
    for job_id in (prompts_swap, store_swap, earlier):
        assert finals[job_id]["state"] == "failed" and finals[job_id]["input_errors"] == []
    assert SECRET not in json.dumps(client.get("/jobs").json())
    assert sorted(os.listdir(s.outside)) == ["credentials.jsonl"]  # nothing written outside
    assert not os.path.exists(f"{s.root}/s1") and not os.path.exists(f"{s.root}/s3")
    assert finals[good]["state"] == "done" and finals[good]["records_done"] == 3  # the service kept serving
    assert_complete(f"{s.root}/s4", 3)


# -- a real service process -------------------------------------------------------------------------
class _Files(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]]  # set per server: the request lines it answered

    def log_message(self, format: str, *args: object) -> None:
        type(self).requests.append(self.requestline)


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Iterator[tuple[str, list[str]]]:
    """An HTTP file server on 127.0.0.1 serving a prompt set; the request lines it saw."""
    folder = tmp_path_factory.mktemp("web")
    write_jsonl(str(folder / "p.jsonl"), prompt_rows(4, seed=15))
    seen: list[str] = []
    handler = type("Files", (_Files,), {"requests": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


@pytest.fixture(scope="module")
def hardened(tiny_teacher_dir, sandbox) -> Iterator[Service]:
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_TOKEN"}
    svc = start_service(tiny_teacher_dir, os.path.join(sandbox.base, "state"), "--data-root", sandbox.root,
                        "--max-body-bytes", "8192", "--allow-host", "Potstill.Internal", "--allow-url-scheme", "http",
                        env=env)
    yield svc
    svc.stop()


def test_a_body_over_the_limit_gets_413_with_or_without_content_length(hardened, sandbox):
    spec = {"prompts": sandbox.prompts, "store": f"{sandbox.root}/body", "rationale_template": "{prompt}" + "x" * 9000}
    body = json.dumps(spec).encode()
    detail = {"detail": "request body larger than this service's limit of 8,192 bytes (--max-body-bytes)"}
    with hardened.client() as c:
        sized = c.post("/jobs", content=body, headers={"content-type": "application/json"})
        assert (sized.status_code, sized.json()) == (413, detail)

        def chunks() -> Iterator[bytes]:  # a generator: sent chunked, without Content-Length
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]

        chunked = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in chunked.request.headers
        assert (chunked.status_code, chunked.json()) == (413, detail)
        assert c.get("/jobs").json() == []
        spec["rationale_template"] = "{prompt}"
        small = json.dumps(spec).encode()
        accepted = c.post("/jobs", content=iter([small[:50], small[50:]]), headers={"content-type": "application/json"})
        assert accepted.status_code == 201, accepted.text
        assert wait_job(c, accepted.json()["id"])["state"] == "done"
    assert "Traceback" not in hardened.log_text()


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(hardened):
    """A client announcing 100 MB is answered at once: the service does not wait for (or buffer) it."""
    host, port = hardened.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(body)["detail"].startswith("request body larger than this service's limit of 8,192 bytes")


def test_without_a_token_only_the_services_own_host_names_are_answered(hardened):
    port = hardened.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "potstill.internal"):
        assert httpx.get(hardened.url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"[::2]:{port}"):
        refused = httpx.get(hardened.url + "/jobs", headers={"Host": host})
        assert refused.status_code == 400, host
        assert "is not a name of this service" in refused.json()["detail"], host
    posted = httpx.post(hardened.url + "/jobs", json={"prompts": "/x", "store": "/y"}, headers={"Host": "evil.example"})
    assert posted.status_code == 400


def test_an_allowed_scheme_is_fetched_and_nothing_else_reaches_out(hardened, sandbox, web):
    base_url, seen = web
    with hardened.client() as c:
        job = wait_job(c, submit(c, prompts=f"{base_url}/p.jsonl", store=f"{sandbox.root}/fetched"))
        assert job["state"] == "done" and job["records_done"] == 4
        assert any("GET /p.jsonl" in line for line in seen)
        before = len(seen)
        same_server_over_https = base_url.replace("http://", "https://") + "/p.jsonl"
        for spec, field in [*attacks(sandbox), ({"prompts": same_server_over_https, "store": f"{sandbox.root}/a"},
                                                "prompts")]:
            response = c.post("/jobs", json=spec)
            assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}: "), response.text
            assert SECRET not in response.text
        time.sleep(0.2)
        assert len(seen) == before  # no refused job made the service fetch anything
        assert SECRET not in c.get("/jobs").text
    assert_complete(f"{sandbox.root}/fetched", 4)
    inputs = os.path.join(hardened.state, "inputs")
    assert not os.path.exists(inputs) or not os.listdir(inputs)  # the fetched copy is removed


def test_a_fifo_is_never_a_prompt_set(in_process, tmp_path):
    """A FIFO named like a prompt file would block the job thread in open() forever: it is refused at
    submission (422 naming the field) and again when the job runs, and the service keeps serving."""
    root = tmp_path / "data"
    root.mkdir()
    good = write_jsonl(str(root / "p.jsonl"), prompt_rows(2, seed=16))
    fifo = str(root / "pipe.jsonl")
    os.mkfifo(fifo)
    app = in_process(data_root=[str(root)])
    refused = app.client.post("/jobs", json={"prompts": fifo, "store": str(root / "s0")})
    assert refused.status_code == 422
    assert refused.json() == {"detail": f"prompts: {fifo} is not a regular file or a datasets folder"}
    folder = root / "saved"
    folder.mkdir()
    os.mkfifo(folder / "data-00000-of-00001.arrow")  # datasets.load_from_disk would block on it too
    in_folder = app.client.post("/jobs", json={"prompts": str(folder), "store": str(root / "s0")})
    assert in_folder.status_code == 422
    assert in_folder.json() == {"detail": f"prompts: {folder}: data-00000-of-00001.arrow is not a regular file "
                                          "or a folder"}

    later = str(root / "later.jsonl")
    swapped = submit(app.client, prompts=write_jsonl(later, prompt_rows(2, seed=17)), store=str(root / "s1"))
    after = submit(app.client, prompts=good, store=str(root / "s2"))
    os.remove(later)
    os.mkfifo(later)  # replaced by a FIFO between submission and run
    app.runner.start()
    assert wait_job(app.client, swapped, timeout=60)["error"] == (
        f"prompts: {later} is not a regular file or a datasets folder")
    assert wait_job(app.client, after, timeout=120)["state"] == "done"
