"""`potstill store report`: the statistics against direct float64 computations, every store kind,
sampling, answers, damaged stores, the CLI, and the page in a real headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from browser import find_chromium, load_page
from storehelpers import build_store

from potstill.share.report import ReportConfig, collect_stats, render_html, write_report
from potstill.store import StoreError, open_store

N = 40  # draws per position in build_store's sampled stores


def _reference_entropy(store_url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position, in a plain loop: entropy of the K + 1 buckets (renormalised), top-1 prob, tail mass."""
    ent, top1, tail = [], [], []
    for rec in open_store(store_url).iter_records():
        for j in range(rec.num_scored):
            logp = [float(x) for x in rec.topk_logprobs[j]] + [float(rec.tail_logprob[j])]
            p = [np.exp(x) for x in logp]
            z = sum(p)
            ent.append(-sum(q / z * np.log(q / z) for q in p if q > 0))
            top1.append(max(np.exp(float(x)) for x in rec.topk_logprobs[j]))
            tail.append(np.exp(float(rec.tail_logprob[j])))
    return np.array(ent), np.array(top1), np.array(tail)


def test_statistics_equal_direct_float64_computations(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"))
    stats = collect_stats(open_store(url, verify_reads=True), ReportConfig())
    ent, top1, tail = _reference_entropy(url)
    np.testing.assert_allclose(stats.entropy, ent, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.top1, top1, rtol=1e-12)
    np.testing.assert_allclose(stats.tail_mass, tail, rtol=1e-12)
    # the stored top-8 + tail of a 300-token softmax: the bucket entropy is below log(9) and above 0
    assert np.all((stats.entropy > 0) & (stats.entropy <= np.log(9) + 1e-12))
    recs = list(open_store(url).iter_records(with_hidden=True))
    assert stats.records_read == stats.records_total == len(recs) and not stats.sampled
    assert stats.seq_lengths.tolist() == [r.num_tokens for r in recs]
    assert stats.scored_lengths.tolist() == [r.num_scored for r in recs]
    for layer, dtype in ((2, "bfloat16"), (4, "float16")):
        states = np.concatenate([r.hidden[layer] for r in recs])
        wide = (states.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else states.astype(np.float32)
        np.testing.assert_allclose(stats.hidden_norms[layer], np.sqrt((wide.astype(np.float64) ** 2).sum(1)), rtol=1e-12)
    # answers: 2 of 14 records have none (i % 7 == 3); references "work #### i" match, "wrong" never does
    assert stats.rationale_records == 14 and stats.with_answer == 12 and stats.with_reference == 14
    expected = sum(1 for i in range(14) if i % 7 != 3 and i % 4)
    assert stats.answers_correct == expected


KINDS = [("topk", "none", "complement"), ("topk", "packed", "direct"), ("topk", "packed", "complement"),
         ("sampled", "none", None), ("sampled", "packed", None), ("both", "none", "direct"), ("both", "packed", "complement")]


@pytest.mark.parametrize("kind,codec,tail", KINDS)
def test_every_store_kind_gets_its_statistics(tmp_path, kind: str, codec: str, tail: str | None) -> None:
    """Unpacked and packed, top-k, sampled and both, direct and complement tails."""
    url = build_store(str(tmp_path / "s"), kind, codec, tail_logprob=tail, layers=() if kind == "both" else ((3, 16, "bfloat16"),))
    stats = collect_stats(open_store(url, verify_reads=True), ReportConfig())
    recs = list(open_store(url).iter_records())
    scored = sum(r.num_scored for r in recs)
    assert len(stats.entropy) == len(stats.top1) == len(stats.token_logprob) == scored
    assert (stats.tail_mass is None) == (kind == "sampled")
    if kind != "sampled":
        assert len(stats.tail_mass) == scored
    if kind == "topk":
        assert stats.distinct_ids is None
    else:
        distinct = np.concatenate([r.sampled.lengths() for r in recs if r.num_scored]).astype(np.float64)
        np.testing.assert_array_equal(stats.distinct_ids, distinct)
    if kind == "sampled":  # no top-k: the entropy is the plug-in estimate of the draws
        ref = []
        for r in recs:
            for j in range(r.num_scored):
                _, c = r.sampled.position(j)
                p = c.astype(np.float64) / N
                ref.append(-(p * np.log(p)).sum())
        np.testing.assert_allclose(stats.entropy, ref, rtol=1e-12, atol=1e-15)
    assert set(stats.hidden_norms) == (set() if kind == "both" else {3})


@pytest.mark.parametrize("kind,codec,tail,want", [
    ("topk", "none", "direct", {"Tail mass per position", "Hidden-state norms per layer"}),
    ("sampled", "packed", None, {"Sampled distinct ids per position", "Hidden-state norms per layer"}),
])
def test_the_page_has_the_plots_of_its_kind_and_needs_nothing_outside(tmp_path, kind, codec, tail, want) -> None:
    url = build_store(str(tmp_path / "s"), kind, codec, tail_logprob=tail, layers=((3, 16, "bfloat16"),), records=6)
    page = render_html(collect_stats(open_store(url, verify_reads=True), ReportConfig()), ReportConfig())
    titles = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,", page)
    assert set(titles) == want | {"Teacher entropy per position", "Top-1 probability per position",
                                  "Sequence and completion lengths", "Answer accuracy"}
    assert ("plug-in estimate" in page) == (kind == "sampled")
    _assert_self_contained(page)
    # text from the store is escaped, never markup
    assert "step two &lt;b&gt;&amp;&lt;/b&gt;." in page and "<b>&</b>" not in page
    assert page.count("class='example'") == 3


def _assert_self_contained(page: str) -> None:
    """Nothing the page needs lies outside it: no external URL, no script, no linked file."""
    assert "<script" not in page.lower()
    for attr in re.findall(r"(?:src|href)\s*=\s*['\"]([^'\"]*)", page):
        assert attr.startswith("data:image/png;base64,"), attr[:80]
    assert not re.search(r"https?://", page)
    assert "<link" not in page.lower() and "@import" not in page


def test_a_big_store_is_sampled_and_the_page_says_so(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), records=30, layers=())
    config = ReportConfig(max_records=8, seed=5)
    a = collect_stats(open_store(url), config)
    b = collect_stats(open_store(url), config)
    assert a.sampled and a.records_read == 8 and a.records_total == 30
    np.testing.assert_array_equal(a.seq_lengths, b.seq_lengths)  # the same seed, the same sample
    other = collect_stats(open_store(url), ReportConfig(max_records=8, seed=6))
    assert not np.array_equal(a.entropy, other.entropy)
    page = render_html(a, config)
    assert "a random sample of <b>8</b> of the 30 records" in page and "seed 5" in page


def test_an_empty_store_gets_a_page_without_plots(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), records=0)
    out = str(tmp_path / "r.html")
    stats = write_report(url, out)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert stats.records_read == 0 and "no committed records yet" in page and "<img" not in page


def test_a_sample_of_no_records_is_refused_in_one_line(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), records=2, layers=())
    with pytest.raises(StoreError, match=r"^--max-records must be at least 1, got 0$"):
        write_report(url, str(tmp_path / "r.html"), ReportConfig(max_records=0))
    assert not (tmp_path / "r.html").exists()


def test_a_damaged_shard_stops_the_report_in_one_line_and_keeps_the_old_page(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), records=6, layers=())
    out = tmp_path / "r.html"
    out.write_text("previous report")
    shard = sorted(os.listdir(os.path.join(url, "shards")))[0]
    arrow = tmp_path / "s" / "shards" / shard / "records.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard}/records.arrow: fails its sha256 check"):
        write_report(url, str(out))
    assert out.read_text() == "previous report"
    assert sorted(os.listdir(tmp_path)) == ["r.html", "s"]  # no temporary file left beside the page


def potstill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_the_page_and_refuses_a_missing_store_in_one_line(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), records=6, layers=())
    out = str(tmp_path / "page.html")
    proc = potstill("store", "report", url, "--out", out, "--max-records", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (a sample of 4 of 6 records)"
    assert "a random sample of <b>4</b> of the 6 records" in (tmp_path / "page.html").read_text(encoding="utf-8")
    bad = potstill("store", "report", str(tmp_path / "nope"), "--out", out)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: no such store: {tmp_path / 'nope'}"]


# -- in a real browser -------------------------------------------------------------------------------
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@needs_chromium
def test_the_page_renders_in_headless_chromium_without_errors(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), "both", "none", records=12)
    out = str(tmp_path / "report.html")
    write_report(url, out)
    result = load_page(out, CHROMIUM)
    assert result.errors == []
    assert result.title == "potstill store report: s"
    assert len(result.images) == 7  # entropy, top-1, tail, lengths, distinct ids, hidden norms, answers
    for image in result.images:  # every plot decoded and laid out
        assert image["complete"] and image["width"] >= 400 and image["height"] >= 200, image
        assert image["shown_width"] > 300, image
    assert "What the store holds" in result.text and "extracted answer" in result.text


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path) -> None:
    """The harness above must fail on what breaks a page: a corrupt plot, a missing file, a script error."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>broken</title></head><body>"
                    "<img alt='corrupt' src='data:image/png;base64,iVBORw0KGgoAAAAbroken'>"
                    "<img alt='missing' src='missing.png'><script>console.error('boom'); notDefined();</script>"
                    "</body></html>")
    result = load_page(str(page), CHROMIUM)
    assert [img["width"] for img in result.images] == [0, 0]
    joined = "\n".join(result.errors)
    assert "console.error: boom" in joined and "notDefined is not defined" in joined
    assert "missing.png" in joined


def test_an_id_stored_twice_is_read_once_and_the_page_says_so(tmp_path) -> None:
    import copy

    url = build_store(str(tmp_path / "s"), records=6, layers=())
    again = copy.deepcopy(open_store(url).record(2))
    with open_store(url).writer("w1") as w:  # a second writer stores record r002 again
        w.write(again)
    store = open_store(url, verify_reads=True)
    assert store.num_records == 7 and store.num_duplicates == 1
    stats = collect_stats(store, ReportConfig())
    assert stats.records_total == stats.records_read == 6 and not stats.sampled
    page = render_html(stats, ReportConfig(examples=0))
    assert "1 record(s) repeat an id committed earlier" in page and "(1 duplicate rows, skipped by every reader)" in page


def test_hidden_norms_stop_at_their_token_budget(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), layers=((2, 16, "float16"),), records=8)
    stats = collect_stats(open_store(url, verify_reads=True), ReportConfig(max_hidden_tokens=10))
    first = np.concatenate([r.hidden[2] for r in open_store(url).iter_records(with_hidden=True)])[:10]
    np.testing.assert_allclose(stats.hidden_norms[2], np.linalg.norm(first.astype(np.float64), axis=1), rtol=1e-12)
