"""manifest.json carries a checksum of its own content: a hand-edited manifest (the vocabulary size,
the top-K) is refused by verify and by every reader in one line naming the file; a manifest without
one (written before it existed) still opens."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from common import build_student
from genhelpers import run_cli
from storehelpers import build_store
from trainhelpers import arithmetic_items, build_teacher_store

from potstill.store import StoreError, open_store, verify_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def edit_manifest(url: str, change) -> dict:
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def bump_vocab(manifest: dict) -> None:
    manifest["tokenizer"]["vocab_size"] += 1


def test_a_new_manifest_carries_a_checksum_that_holds(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"))
    with open(os.path.join(url, "manifest.json")) as f:
        assert json.load(f)["checksum"].startswith("sha256:")
    assert verify_store(url).ok and open_store(url).num_records == 14


def test_an_edited_vocab_size_fails_verify_naming_the_manifest(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"))
    edit_manifest(url, bump_vocab)
    with pytest.raises(StoreError, match=r"manifest.json: fails its checksum"):
        open_store(url)
    proc = run_cli(["store", "verify", url], env=ENV)
    lines = [ln for ln in proc.stderr.splitlines() + proc.stdout.splitlines() if "manifest.json" in ln]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr + proc.stdout
    assert "checksum" in lines[0]


def test_a_manifest_without_a_checksum_still_opens_and_verifies(tmp_path) -> None:
    """As written before the checksum existed: opened and verified as before, with nothing to compare."""
    url = build_store(str(tmp_path / "s"))
    edit_manifest(url, lambda m: m.pop("checksum"))
    assert open_store(url).num_records == 14 and verify_store(url).ok


@pytest.mark.slow
def test_train_refuses_an_edited_manifest_in_one_line(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir) -> None:
    store = str(tmp_path / "store")
    build_teacher_store(store, tiny_teacher_dir, arithmetic_items(12, seed=3), shard_records=12, layer_indices=())
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    edited = str(tmp_path / "edited")
    shutil.copytree(store, edited)
    edit_manifest(edited, bump_vocab)
    out = str(tmp_path / "out")
    proc = run_cli(["train", "--store", edited, "--student", student, "--out", out, "--max-steps", "1",
                    "--batch-size", "4", "--report-to", "none", "--eval-fraction", "0"], env=ENV, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "manifest.json" in errors[0] and "checksum" in errors[0], errors[0]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
