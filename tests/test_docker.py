"""The docker images: every path they COPY exists in the build context, and they run the CLI."""

from __future__ import annotations

import glob
import json
import os
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
    for package in ("store", "teacher_gen", "student_train", "cli", "pyproject.toml", "README.md"):
        assert package in copied, f"{os.path.basename(dockerfile)} does not COPY {package}"
    entry = [args for op, args in steps if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["potstill"]
    assert any(op == "RUN" and "pip install" in args for op, args in steps)


def test_dockerignore_keeps_the_packages():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for package in ("store", "teacher_gen", "student_train", "cli"):
        assert package not in ignored


def test_the_generation_image_runs_as_an_unprivileged_user_with_writable_volumes():
    """No Docker engine here: read the Dockerfile. The last USER is a named non-root user, created by a
    RUN before it and after the install; /data and /state (the documented mount points) belong to it."""
    steps = instructions(os.path.join(ROOT, "docker", "generate.Dockerfile"))
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
    assert f"chown {user}:{user} /data /state" in create
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"HOME=/home/{user}" in env  # caches (HF, Triton, torch.compile) go where the user can write
