"""The HTML report renders in headless Chromium: a screenshot with real content, not a blank page."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from attribdb.query.formats import render_html
from attribdb.query.results import Hit, QueryResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _hit(rank: int, score: float) -> Hit:
    tokens = ["The", " capital", " of", " Vor", "landia", " is", " Qu", "essel", "."]
    contributions = [0.1, 0.5, -0.2, 2.0, 1.5, 0.3, 3.0, 2.5, -0.4]
    return Hit(rank=rank, score=score, normalized_score=0.4, self_influence=12.0,
               module_scores={"transformer.h.0.mlp.c_fc": score * 0.7, "transformer.h.1.attn.c_attn": score * 0.3},
               doc_id=f"doc{rank}", source="corpus.jsonl:1", token_span=[0, 9], char_span=[0, 36],
               text="The capital of Vorlandia is Quessel.", shard=0, row=rank, exact_score=score,
               tokens=tokens, token_contributions=contributions)


def test_report_is_self_contained_and_escapes_text():
    result = QueryResult("The capital of <Vorlandia> is", " Quessel", "exact", [_hit(1, 9.5)], [_hit(2, -3.0)],
                         20.0, 100, {"total": 12.0})
    page = render_html([result])
    assert "&lt;Vorlandia&gt;" in page and "<Vorlandia>" not in page
    assert "http" not in page.replace("http-equiv", ""), "the report must not load anything"
    assert page.count("rgba(46,158,91") >= 7 and "rgba(200,66,59" in page  # green supports, red opposes


def test_crafted_metadata_reaches_the_report_escaped():
    """A row's metadata comes from a file on disk: a token span or a source that carries markup
    must not become markup in the report."""
    hit = _hit(1, 1.0)
    hit.token_span, hit.source, hit.doc_id = ["<script>alert(1)</script>", 3], "<b>src</b>", "<i>doc</i>"
    page = render_html([QueryResult("p", " c", "index", [hit], [], 1.0, 1, {})])
    assert "<script>alert" not in page and "<b>src" not in page and "<i>doc" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Chromium is installed by .ci/run")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image, ImageStat

    result = QueryResult("The capital of Vorlandia is", " Quessel", "exact", [_hit(1, 9.5), _hit(2, 4.0)],
                         [_hit(3, -3.0)], 20.0, 100, {"total": 12.0})
    page = tmp_path / "report.html"
    page.write_text(render_html([result]))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,900",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    stat = ImageStat.Stat(image)
    assert max(stat.stddev) > 20, "the screenshot is blank"
    colours = image.getcolors(maxcolors=1 << 20)
    greens = sum(count for count, (r, g, b) in colours if g > r + 40 and g > b + 20)
    assert greens > 200, "no token is highlighted green"
