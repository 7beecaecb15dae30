"""Output formats for query results: a terminal table, JSON lines, an HTML report."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import TextIO

from attribdb.query.results import Hit, QueryResult

FORMATS = ("table", "json", "html")
SNIPPET = 72


def _snippet(text: str, width: int = SNIPPET) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _normalized(value: float | None) -> str:
    """A normalized score, or "-" where a mode has none (text mode ranks by BM25 alone)."""
    return "-" if value is None else f"{value:.3f}"


def _hit_lines(hits: list[Hit]) -> list[str]:
    """One line per hit: its exact score where it was recomputed (marked ``=``), else the
    compressed one (marked ``~``), or in text mode its BM25 score (unmarked)."""
    lines = [f"  {'rank':>4}  {'score':>12}  {'norm':>6}  {'document':<18}  text"]
    for h in hits:
        exact = h.exact_score is not None
        score, norm = h.final_score, h.final_normalized_score
        mark = "=" if exact else "~" if norm is not None else " "
        lines.append(f"  {h.rank:>4}  {mark}{score:>11.4g}  {_normalized(norm):>6}  {_snippet(h.doc_id, 18):<18}  "
                     f"{_snippet(h.text)}")
        if h.checkpoint_scores:
            lines.append(f"  {'':>4}  {'':>12}  per checkpoint: {_checkpoints_text(h)}")
    return lines


def _checkpoints_text(hit: Hit) -> str:
    """A trajectory hit's score and normalized score at each checkpoint (unweighted)."""
    return " · ".join(f"{name} {values['score']:.4g} ({_normalized(values['normalized_score'])})"
                      for name, values in hit.checkpoint_scores.items())


def _summary(r: QueryResult) -> str:
    return (f"{r.mode}, {r.candidates} rows scored, {r.rescored} recomputed in full, "
            f"{r.timings_ms.get('total', 0):.1f} ms")


HITS_TITLE = {"score": "named documents, by the rank they have in the index answer:",  # else the top rows
              "text": "best text matches (BM25):",
              "hybrid": "best by reciprocal-rank fusion of BM25 and influence:"}


def render_table(results: list[QueryResult]) -> str:
    blocks = []
    for r in results:
        lines = [f"query: {_snippet(r.prompt, 60)!r} → {_snippet(r.completion, 40)!r}  [{_summary(r)}]",
                 HITS_TITLE.get(r.mode, "most influential (supporting):")]
        lines += _hit_lines(r.hits)
        if r.opponents:
            lines += ["most negative (opposing):"] + _hit_lines(r.opponents)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_json(results: list[QueryResult]) -> str:
    """One JSON object per query per line."""
    return "\n".join(json.dumps(r.to_dict()) for r in results)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d2433; background: #fbfbfd; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.query { border-left: 4px solid #4b6cb7; padding: .5rem 1rem; background: #eef2fb; }
.hit { border: 1px solid #d8dce6; border-radius: 6px; padding: .6rem 1rem; margin: .8rem 0; background: white; }
.meta { color: #556; font-size: .85rem; } .score { font-weight: 600; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .85rem; line-height: 1.5; }
table.modules { font-size: .75rem; border-collapse: collapse; margin-top: .4rem; }
table.modules td { padding: 0 .5rem; } .bar { display: inline-block; height: .6rem; }
.pos { background: #2e9e5b; } .neg { background: #c8423b; }
"""


def _token_html(hit: Hit) -> str:
    if not hit.tokens or hit.token_contributions is None:
        return html.escape(hit.text)
    scale = max((abs(c) for c in hit.token_contributions), default=0.0) or 1.0
    spans = []
    for token, contribution in zip(hit.tokens, hit.token_contributions):
        alpha = min(1.0, abs(contribution) / scale)
        colour = "46,158,91" if contribution >= 0 else "200,66,59"
        spans.append(f'<span title="{contribution:.4g}" style="background: rgba({colour},{alpha:.3f})">'
                     f"{html.escape(token)}</span>")
    return "".join(spans)


def _modules_html(hit: Hit) -> str:
    if not hit.module_scores:
        return ""
    scale = max(abs(v) for v in hit.module_scores.values()) or 1.0
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:.4g}</td><td><span class='bar {'pos' if value >= 0 else 'neg'}'"
        f" style='width:{80 * abs(value) / scale:.0f}px'></span></td></tr>"
        for name, value in hit.module_scores.items())
    return f"<details><summary class='meta'>per-module scores</summary><table class='modules'>{rows}</table></details>"


def _hits_html(title: str, hits: list[Hit]) -> str:
    cards = []
    for h in hits:
        exact = f" · exact {h.exact_score:.4g}" if h.exact_score is not None else ""
        cards.append(
            f"<div class='hit'><div><span class='score'>#{h.rank} · score {h.score:.4g}{exact}</span>"
            f" <span class='meta'>· normalised {_normalized(h.normalized_score)} · document {html.escape(h.doc_id)}"
            f" · {html.escape(h.source)}"
            f" · tokens {html.escape(str(h.token_span[0]))}–{html.escape(str(h.token_span[1]))}"
            "</span></div>"
            + (f"<div class='meta'>per checkpoint: {html.escape(_checkpoints_text(h))}</div>"
               if h.checkpoint_scores else "") +
            f"<div class='text'>{_token_html(h)}</div>{_modules_html(h)}</div>")
    return f"<h3>{title}</h3>" + "".join(cards) if hits else ""


def render_html(results: list[QueryResult]) -> str:
    """A self-contained page; tokens are shaded by their contribution (green supports, red opposes)."""
    sections = []
    for r in results:
        sections.append(
            f"<h2>Query</h2><div class='query'><b>prompt</b> {html.escape(r.prompt)}<br>"
            f"<b>completion</b> {html.escape(r.completion)}<div class='meta'>{html.escape(_summary(r))}</div></div>"
            + _hits_html("Named documents, by the rank they have in the index answer" if r.mode == "score"
                         else "Most influential training sequences", r.hits)
            + _hits_html("Most negative (opposing) sequences", r.opponents))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>attribdb report</title>"
            f"<style>{_STYLE}</style></head><body><h1>attribdb: which training data made the model say this?</h1>"
            + "".join(sections) + "</body></html>")


RENDERERS = {"table": render_table, "json": render_json, "html": render_html}


def render(results: list[QueryResult], fmt: str) -> str:
    return RENDERERS[fmt](results)


def write(results: Iterable[QueryResult], fmt: str, handle: TextIO) -> None:
    """Results as they come, in the text ``render`` would give: a table block or a JSON line per
    result, flushed, so a long batch shows its first answers at once and never holds them all;
    HTML is one page, written at the end."""
    if fmt == "html":
        handle.write(render_html(list(results)) + "\n")
        return
    for i, result in enumerate(results):
        handle.write(("\n" if i and fmt == "table" else "") + render([result], fmt) + "\n")
        handle.flush()
