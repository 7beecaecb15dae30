"""The Python API's batch and document calls against the exhaustive ground truth, and their CLI:
score() of named documents, streamed and chunked batches with progress on stderr, exhaustive's
query forms and both rankings from one pass."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from collections import Counter

import pytest

import attribdb.api as api
from attribdb.errors import QueryError
from attribdb.query import batches

from dbtools import cli_here, one_line_error

PROMPT, COMPLETION = "the cat sat near the", " river stone"
QUERIES = [(PROMPT, COMPLETION), ("a bird flew over", " the old house"), ("red blue green", " small large quick")]


@pytest.fixture(scope="module")
def db(built_db):
    with api.open(built_db) as database:
        yield database


@pytest.fixture(scope="module")
def named(db):
    """Two documents of several rows each (a long document is split into windows)."""
    rows = Counter(hit.doc_id for hit in db.self_influence(top=db.engine.rows))
    docs = [doc for doc, count in rows.most_common() if count > 1][:2]
    assert len(docs) == 2
    return docs


@pytest.fixture(scope="module")
def truth(db):
    """Every row's exact scores and both rankings, from one exhaustive pass."""
    return db.exhaustive(PROMPT, COMPLETION, k=db.engine.rows, rank_by="both")


def _ids(hits):
    return [(h.shard, h.row) for h in hits]


def test_score_of_named_documents_equals_their_exhaustive_scores(db, named, truth):
    result = db.score(PROMPT, COMPLETION, named)
    every = {(h.shard, h.row): h for h in truth["score"].hits}
    expected = {pair for pair, hit in every.items() if hit.doc_id in named}
    assert result.mode == "score" and set(_ids(result.hits)) == expected and len(expected) > 2
    for hit in result.hits:
        full = every[(hit.shard, hit.row)]
        assert hit.exact_score == pytest.approx(full.score, rel=1e-4, abs=1e-6)
        assert hit.exact_normalized_score == pytest.approx(full.normalized_score, rel=1e-4, abs=1e-6)
        # float32, summed in another order than the score (the rows recomputed in other batches, which
        # depend on the index's candidates: 1.6e-5 apart once)
        assert sum(hit.token_contributions) == pytest.approx(hit.exact_score, rel=1e-4, abs=1e-9)
        assert len(hit.tokens) == len(hit.token_contributions)
    assert [h.rank for h in result.hits] == sorted(h.rank for h in result.hits)


@pytest.mark.parametrize("rank_by", ["normalized", "score"])
def test_score_ranks_are_places_in_the_default_answer_then_by_compressed_key(db, rank_by):
    """A row the default answer returns has its rank there; the others follow in the order of a
    compressed-only ranking of every row."""
    rows = db.engine.rows
    answer = db.query(PROMPT, COMPLETION, k=128, rank_by=rank_by).hits  # all the default candidates
    place = {(h.shard, h.row): h.rank for h in answer}
    compressed = db.query(PROMPT, COMPLETION, k=rows, candidates=rows, rescore=0, rank_by=rank_by).hits
    outside = [(h.shard, h.row) for h in compressed if (h.shard, h.row) not in place]
    assert outside, "the test database must have rows beyond the default candidates"
    doc_of = {(h.shard, h.row): h.doc_id for h in compressed}
    docs = list(dict.fromkeys([answer[0].doc_id, doc_of[outside[0]], doc_of[outside[-1]]]))
    result = db.score(PROMPT, COMPLETION, docs, rank_by=rank_by)
    expected = [place[pair] if pair in place else len(answer) + 1 + outside.index(pair) for pair in _ids(result.hits)]
    assert [h.rank for h in result.hits] == expected and expected[0] == 1 and expected[-1] == rows


def test_unknown_document_is_one_clear_error(db, built_db, named):
    with pytest.raises(QueryError, match="unknown document id 'no-such-doc'"):
        db.score(PROMPT, COMPLETION, [named[0], "no-such-doc"])
    with pytest.raises(QueryError, match="at least one"):
        db.score(PROMPT, COMPLETION, [])
    with pytest.raises(QueryError, match="list of document ids"):
        db.score(PROMPT, COMPLETION, named[0])
    one_line_error(cli_here("query", built_db, "--prompt", PROMPT, "--completion", COMPLETION, "--doc", "nope"),
                   "unknown document id 'nope'")
    refused = cli_here("query", built_db, "--prompt", PROMPT, "--completion", COMPLETION, "--doc", named[0],
                       "--mode", "exact")
    assert refused.returncode == 2 and "--doc" in refused.stderr


def test_cli_doc_prints_the_api_answer(db, built_db, named):
    out = cli_here("query", built_db, "--prompt", PROMPT, "--completion", COMPLETION, "--doc", named[0],
                   "--doc", named[1], "--format", "json")
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.strip().splitlines()
    printed = json.loads(line)
    expected = db.score(PROMPT, COMPLETION, named)
    assert printed["mode"] == "score"
    assert [(h["shard"], h["row"], h["rank"]) for h in printed["hits"]] == [(h.shard, h.row, h.rank)
                                                                          for h in expected.hits]
    assert [h["exact_score"] for h in printed["hits"]] == pytest.approx([h.exact_score for h in expected.hits],
                                                                        rel=1e-5)
    table = cli_here("query", built_db, "--prompt", PROMPT, "--completion", COMPLETION, "--doc", named[0]).stdout
    assert "named documents" in table and named[0] in table


def test_batches_in_chunks_equal_one_chunk(db, monkeypatch):
    whole = db.query_batch(QUERIES, k=5, quiet=True)
    exact_whole = db.exact_batch(QUERIES[:2], k=3, quiet=True)
    monkeypatch.setattr(batches, "QUERY_BUDGET", dataclasses.replace(batches.QUERY_BUDGET, most=1))
    streamed = db.query_iter(QUERIES, k=5, quiet=True)
    assert not isinstance(streamed, list)
    for one, other in zip(streamed, whole, strict=True):
        assert _ids(one.hits) == _ids(other.hits) and _ids(one.opponents) == _ids(other.opponents)
    for one, other in zip(db.exact_batch(QUERIES[:2], k=3, quiet=True), exact_whole, strict=True):
        assert _ids(one.hits) == _ids(other.hits)
        assert [h.exact_score for h in one.hits] == pytest.approx([h.exact_score for h in other.hits], rel=1e-5)


def test_bad_batches_are_refused_before_any_work(db):
    with pytest.raises(QueryError, match="two strings"):
        db.query_batch("the cat")
    with pytest.raises(QueryError, match="pair"):
        db.query_batch([("only a prompt",)])
    with pytest.raises(QueryError, match="completion"):
        db.exhaustive("a prompt")
    with pytest.raises(QueryError, match="one prompt"):
        db.exhaustive(QUERIES, " completion")


def test_batch_progress_goes_to_stderr_unless_quiet(db, capfd):
    db.query_batch(QUERIES, k=2)
    out, err = capfd.readouterr()
    assert out == "" and "query" in err and "3/3" in err
    db.query_batch(QUERIES, k=2, quiet=True)
    db.query(PROMPT, COMPLETION, k=2)
    assert capfd.readouterr() == ("", "")


def _on_a_terminal(*args) -> tuple[subprocess.CompletedProcess, str]:
    """`attribdb ARGS` with stderr on a pseudo-terminal, as a user sees it: (result, what stderr showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 wide
    result = subprocess.run([sys.executable, "-m", "attribdb", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=terminal, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    os.close(terminal)
    shown = b""
    while True:
        try:
            block = os.read(controller, 1 << 16)
        except OSError:  # Linux: EIO once the terminal's other end is closed and drained
            break
        if not block:
            break
        shown += block
    os.close(controller)
    return result, shown.decode(errors="replace")


@pytest.mark.slow
def test_cli_batch_progress_on_a_terminal_and_quiet_silences_it(built_db, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in QUERIES))
    args = ("query", built_db, "--queries", queries, "--format", "json", "-k", "2")
    loud, shown = _on_a_terminal(*args)
    assert loud.returncode == 0 and "query" in shown and "3/3" in shown
    assert [json.loads(line)["prompt"] for line in loud.stdout.splitlines()] == [p for p, _ in QUERIES]
    quiet, shown = _on_a_terminal(*args, "--quiet")
    assert quiet.returncode == 0 and shown == ""
    assert [json.loads(line)["hits"] for line in quiet.stdout.splitlines()] == \
        [json.loads(line)["hits"] for line in loud.stdout.splitlines()]


def test_exhaustive_both_rankings_equal_two_passes(db, truth):
    for ranking in ("normalized", "score"):
        alone = db.exhaustive([(PROMPT, COMPLETION)], k=db.engine.rows, rank_by=ranking, quiet=True)[0]
        both = truth[ranking]
        assert _ids(both.hits) == _ids(alone.hits) and _ids(both.opponents) == _ids(alone.opponents)
        assert [h.score for h in both.hits] == pytest.approx([h.score for h in alone.hits], rel=1e-6, abs=1e-9)
    batch = db.exhaustive(QUERIES, k=4, rank_by="both", quiet=True)
    assert set(batch) == {"normalized", "score"} and all(len(v) == len(QUERIES) for v in batch.values())
    assert _ids(batch["score"][0].hits) == _ids(truth["score"].hits)[:4]
