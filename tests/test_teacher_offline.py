"""A hub teacher with no network: refused in one line when it is not in the local cache (offline
mode, or a hub that cannot be reached), without the hub client's half-minute of retries; read from
the cache when it is there. Reading a teacher's dtype prints no deprecation notice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from genhelpers import run_cli

# A closed port on this machine: a connection is refused at once, as with no network.
UNREACHABLE = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


def test_reading_a_config_without_dtype_prints_no_deprecation() -> None:
    """`torch_dtype` is the deprecated alias of `dtype`: reading it logs a notice (once per process,
    hence a fresh one here)."""
    code = ("from transformers import LlamaConfig\n"
            "from potstill.teacher_gen.model_info import resolve_dtype\n"
            "c = LlamaConfig(); c.dtype = None\n"
            "assert resolve_dtype('auto', c) == 'float32'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["generate", "student"])
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, UNREACHABLE], ids=["offline", "unreachable"])
def test_an_uncached_hub_teacher_is_refused_in_one_line(tmp_path, command, env) -> None:
    args = (["generate", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "store")]
            if command == "generate" else ["student", "init", "--layers", "2", "--out", str(tmp_path / "s")])
    proc = run_cli([*args, "--teacher", "nobody/no-such-model"], env={**env, "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher nobody/no-such-model is neither a local folder "
                                                   "nor in the local Hugging Face cache"), proc.stderr
    assert ("HF_HUB_OFFLINE is set" if env.get("HF_HUB_OFFLINE") == "1" else "http://127.0.0.1:9 cannot be reached") \
        in lines[0]
    assert "hf download nobody/no-such-model" in lines[0]
    assert not os.path.exists(tmp_path / "store") and not os.path.exists(tmp_path / "s")


def test_a_cached_teacher_loads_from_the_cache_when_the_hub_cannot_be_reached(tiny_teacher_dir, tmp_path) -> None:
    """The teacher's files laid out as the hub client caches them: with the hub unreachable the run goes
    offline and reads them (it would otherwise fail after retrying)."""
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_teacher_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    proc = run_cli(["student", "init", "--teacher", "someone/tiny", "--layers", "1", "--out", str(tmp_path / "s")],
                   env={**UNREACHABLE, "HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr
    assert os.path.isfile(tmp_path / "s" / "model.safetensors")


def test_a_hub_teacher_found_usable_is_probed_once_per_process(monkeypatch) -> None:
    """`generate` checks before its start-up phases and the runner again: one network probe, not two."""
    from huggingface_hub import constants

    from potstill.teacher_gen import model_info

    probes: list[str] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_info, "_USABLE", set())
    monkeypatch.setattr(model_info, "_reachable", lambda endpoint: probes.append(endpoint) or True)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    model_info.check_hub_teacher("someone/probed-once")
    model_info.check_hub_teacher("someone/probed-once")
    assert len(probes) == 1
    model_info.check_hub_teacher("someone/probed-once", revision="v2")  # another revision is another check
    assert len(probes) == 2
