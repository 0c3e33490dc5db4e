"""The pictures a user is shown: the training loss curve, the demo's comparison and the store report's
plots. Each has a title and labelled axes, no text cut off, no legend over the data (tests/figcheck.py
measures the drawn figure), and each page shows every picture whole in headless Chromium; a
screenshot of each page is kept in $POTSTILL_ARTIFACTS (CI keeps that folder), else in the test's
temporary folder.
"""

from __future__ import annotations

import json
import os

import pytest
from browser import find_chromium, load_page
from common import write_jsonl
from figcheck import problems
from genhelpers import config
from storehelpers import build_store
from test_plots import history

from potstill.share.report import ReportConfig, collect_stats, report_figures, write_report
from potstill.store import open_store
from potstill.student_train.plots import comparison_figure, loss_curve_figure
from potstill.teacher_gen.runner import generate

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
TABLE = [["teacher (writes the store)", "1,125,504", "100.0%", "-"],
         ["student: sparse KD + rationales + hidden", "169,280", "99.3%", "354"],
         ["student: final answers only", "169,280", "32.7%", "52"]]
COLUMNS = ["model", "params", "held-out accuracy", "store bytes/token"]


def artifacts(tmp_path) -> str:
    folder = os.environ.get("POTSTILL_ARTIFACTS") or str(tmp_path / "artifacts")
    os.makedirs(folder, exist_ok=True)
    return folder


def demo_figure():
    base = [{k: v for k, v in e.items() if k not in ("kd", "hidden")} for e in history()]
    return comparison_figure({"KD student": history(), "baseline": base}, TABLE, COLUMNS,
                             {"teacher": 1.0, "KD student": 0.993, "baseline": 0.327})


# -- the figures, measured ---------------------------------------------------------------------------
@pytest.mark.parametrize("log", ["full", "total only", "nothing logged", "flat"])
def test_the_loss_curve_is_titled_labelled_whole_and_its_legend_covers_no_curve(log):
    logs = {"full": history(), "total only": [{"step": s, "loss": 3.0 / s} for s in range(1, 60)],
            "nothing logged": [{"step": 3, "train_loss": 1.0}],
            # a flat curve runs along the top right, where a legend inside the axes would sit
            "flat": [{"step": s, "loss": 2.0, "kd": 2.0 - 1e-3 * s} for s in range(1, 60)]}
    fig, _ = loss_curve_figure(logs[log], {"kd_loss": 0.3})
    assert problems(fig) == []


def test_the_demo_picture_is_titled_labelled_and_whole_with_every_table_cell():
    fig = demo_figure()
    assert problems(fig) == []
    assert fig.get_suptitle()


@pytest.mark.parametrize("kind,codec,tail,layers", [("both", "none", "direct", ((2, 16, "float16"),)),
                                                    ("sampled", "packed", None, ()), ("topk", "packed", "complement", ())])
def test_every_report_plot_is_titled_labelled_and_whole(tmp_path, kind, codec, tail, layers):
    url = build_store(str(tmp_path / "s"), kind, codec, tail_logprob=tail, records=12, layers=layers)
    figures = report_figures(collect_stats(open_store(url), ReportConfig()))
    assert len(figures) >= 4
    for title, _, fig in figures:
        assert fig.get_suptitle() == title
        assert problems(fig) == [], title


def test_the_figure_check_catches_a_covered_curve_a_cut_label_and_a_missing_title():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.subplots()
    ax.plot(range(10), [5.0] * 10, label="flat")  # right under a legend at the top
    ax.set_ylim(4.0, 5.05)
    ax.legend(loc="upper right")
    ax.set_xlabel("step")
    fig.text(0.9, 0.5, "a label running off the right edge")
    found = "\n".join(problems(fig))
    assert "the legend covers" in found and "'flat'" in found
    assert "is cut off" in found and "no title" in found and "the y axis has no label" in found


# -- the pages, in a real browser ----------------------------------------------------------------------
@pytest.mark.slow
@needs_chromium
def test_the_report_page_shows_every_plot_whole_in_chromium(tmp_path):
    url = build_store(str(tmp_path / "s"), "both", "none", records=12, layers=((2, 16, "float16"),))
    page = str(tmp_path / "report.html")
    write_report(url, page)
    for width in (1100, 700):  # a wide window, and a narrow one the plots must shrink into
        result = load_page(page, CHROMIUM, width=width, screenshot=True)
        with open(os.path.join(artifacts(tmp_path), f"store-report-{width}.png"), "wb") as f:
            f.write(result.screenshot or b"")
        assert result.errors == []
        assert result.scroll_width <= result.page_width, "something sticks out of the page sideways"
        assert len(result.images) >= 6
        for image in result.images:
            assert image["complete"] and image["width"] > 0, image
            assert image["left"] >= 0 and image["right"] <= result.page_width + 0.5, image  # not cut at the edge
            # drawn whole: scaled, never cropped (same aspect ratio as the PNG)
            assert abs(image["shown_height"] / image["shown_width"] - image["height"] / image["width"]) < 0.01, image


@needs_chromium
def test_the_demo_picture_shows_whole_in_chromium(tmp_path):
    from potstill.student_train.plots import write_comparison

    path = str(tmp_path / "report.png")
    base = [{k: v for k, v in e.items() if k not in ("kd", "hidden")} for e in history()]
    write_comparison(path, {"KD student": history(), "baseline": base}, TABLE, COLUMNS,
                     {"teacher": 1.0, "KD student": 0.993, "baseline": 0.327})
    result = load_page(path, CHROMIUM, width=1200, screenshot=True)
    with open(os.path.join(artifacts(tmp_path), "demo-report.png"), "wb") as f:
        f.write(result.screenshot or b"")
    assert result.errors == []
    [image] = result.images
    assert image["complete"] and (image["width"], image["height"]) == (1100, 640)
    assert image["shown_width"] == 1100 and image["right"] <= result.page_width


# -- the report's default reference field --------------------------------------------------------------
def test_the_default_reference_is_found_in_a_store_made_with_default_field_names(tmp_path, tiny_teacher_dir):
    """`--mode generate --rationale` over a prompt file with the default fields (prompt, completion):
    the completion is the reference, and the report finds it without --reference-field."""
    rows = [{"id": f"q{i}", "prompt": f"what is {i} plus {i}?", "completion": f"{i} and {i} make {2 * i}. #### {2 * i}"}
            for i in range(6)]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store, mode="generate", rationale=True, max_new_tokens=6))
    stats = collect_stats(open_store(store), ReportConfig())
    assert stats.rationale_records == 6 and stats.with_reference == 6
    references = [e["reference"] for e in stats.examples]
    assert references and all(r is not None and r.isdigit() for r in references), references  # read after "####"
    # a store whose prompt file kept an `answer` field: that one, as before
    url = build_store(str(tmp_path / "m"), records=14)
    assert collect_stats(open_store(url), ReportConfig()).with_reference == 14
    assert json.loads(json.dumps(stats.reference_field)) == ""
