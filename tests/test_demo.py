"""`potstill demo` at a small size: the whole two-phase story through the real CLI, and its report.

The full-size demo (2400 problems, 600 steps: KD student 99% vs baseline 33%) takes about 85 s and
is measured in docs/results.md; here the steps are few, so only the plumbing and the
shipped teacher are checked, not the margin.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from potstill.cli.main import app
from potstill.share import store_info
from potstill.store import open_store, verify_store


@pytest.mark.slow
def test_demo_small_run_writes_report_and_real_stores(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--student-steps", "3", "--train-problems", "48", "--eval-problems", "20",
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    for key in ("teacher", "student_kd", "student_baseline"):
        assert 0.0 <= report[key]["accuracy"] <= 1.0
        assert report[key]["params"] > 0
    # the shipped teacher really solves held-out problems step by step
    assert report["teacher"]["accuracy"] >= 0.9
    # same size, same init: the students differ only in what they were trained on
    assert report["student_kd"]["params"] == report["student_baseline"]["params"]
    assert report["student_kd"]["params"] < report["teacher"]["params"]
    assert report["margin"] == report["student_kd"]["accuracy"] - report["student_baseline"]["accuracy"]
    assert "held-out accuracy" in result.output and "store bytes/token" in result.output
    # the store's byte figures, as `potstill store info` prints them (`potstill.store.sizes`)
    assert f"student_kd store: {store_info(open_store(str(out / 'rationale.store')))['sizes_line']}" in result.output

    # phase one wrote a real rationale store: top-k targets, one hidden layer, rationale and answer text
    assert verify_store(str(out / "rationale.store")).ok
    store = open_store(str(out / "rationale.store"))
    assert store.manifest.targets.k == 16 and [layer.index for layer in store.manifest.hidden.layers] == [2]
    records = list(store.iter_records())
    assert len(records) == 48
    assert sum(bool(r.answer) and bool(r.rationale) for r in records) >= 40
    assert report["student_kd"]["store"]["bytes_per_token"] > 0

    # phase two saved both students where a user finds them
    for name in ("student_kd", "student_baseline"):
        assert os.path.exists(out / name / "training_report.json")
        assert (out / name / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report as a picture: both students' curves (3 steps, each logged), the bars and the table
    from matplotlib import image as mimage
    from matplotlib.colors import to_rgb

    pixels = mimage.imread(str(out / "report.png"))
    assert pixels.shape[:2] == (640, 1100)
    for colour in ("#3b6ea5", "#c0504d", "#8c8c8c"):
        assert (abs(pixels[..., :3] - to_rgb(colour)) < 0.02).all(axis=-1).sum() > 50, colour


@pytest.mark.slow
def test_demo_rerun_into_same_folder_starts_over(readme_path, tmp_path):
    # The first run is the README path's demo (24 problems), rerun here in a copy of its folder.
    out = tmp_path / "demo"
    shutil.copytree(readme_path["dir"] / "potstill-demo", out)
    assert len(list(open_store(str(out / "rationale.store")).iter_records())) == 24
    (out / "keep.txt").write_text("mine")
    args = ["demo", "--out", str(out), "--student-steps", "1", "--eval-problems", "5", "--threads", "1",
            "--train-problems", "12"]
    assert CliRunner().invoke(app, args).exit_code == 0
    # the store holds this run's problems only (a resumed store would still hold 24), user files stay
    assert len(list(open_store(str(out / "rationale.store")).iter_records())) == 12
    assert (out / "keep.txt").read_text() == "mine"


def test_demo_tokenizer_reads_numbers_digit_by_digit_unless_told_not_to():
    """build_tokenizer rebuilds the shipped teacher's tokenizer; bench/cross_tokenizer.py's student
    tokenizer is the same recipe without the digit split, so its merges join a digit
    to others or to a space."""
    from transformers import AutoTokenizer

    from potstill.cli.demo.run import CHECKPOINT
    from potstill.cli.demo.teacher import build_tokenizer

    text = "What is 4821 + 9377?\n8+7+1=16, write 6 carry 1."
    split = build_tokenizer()
    assert split.get_vocab() == AutoTokenizer.from_pretrained(CHECKPOINT).get_vocab()
    digits = [split.decode([t]) for t in split(text, add_special_tokens=False).input_ids]
    assert [p for p in digits if any(c.isdigit() for c in p)] == list("482193778711661")
    joined = build_tokenizer(5, 320, split_digits=False)
    pieces = [joined.decode([t]) for t in joined(text, add_special_tokens=False).input_ids]
    assert "".join(pieces) == text and {" 4", "16"} <= set(pieces)  # tokens the teacher never names
