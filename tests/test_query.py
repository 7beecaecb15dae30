"""The query engine against the exhaustive ground truth, and its CLI, shell and formats."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import attribdb.api as api
from attribdb.errors import ModelMismatchError, QueryError, StoreError
from attribdb.query.options import as_queries

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, cli, cli_here, copy_manifest, rewrite_manifest

QUERIES = [
    {"prompt": "the cat sat near the", "completion": " river stone"},
    {"prompt": "a bird flew over", "completion": " the old house"},
    {"prompt": "red blue green", "completion": " small large quick"},
    {"prompt": "north south", "completion": " east west city"},
]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, model_dir) -> Path:
    root = tmp_path_factory.mktemp("qdb")
    corpus = write_corpus(root / "corpus.jsonl", 150, seed=5)
    db = root / "db"
    settings = [s for s in SMALL_SETTINGS]
    settings[settings.index("--row-bytes") + 1] = "8192"  # room for most of every row's components on this tiny model
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *settings)
    return db


@pytest.fixture(scope="module")
def db(db_path):
    with api.open(db_path) as database:
        yield database


@pytest.fixture(scope="module")
def every_row(db):
    """The ground truth: every row of every query by its exact score, both rankings from one exhaustive
    pass (any top k is the first k of these)."""
    return db.exhaustive(QUERIES, k=10_000, rank_by="both")


def _ids(hits):
    return [(h.shard, h.row) for h in hits]


def _ranked_by(hit, rank_by):
    return hit.final_score if rank_by == "score" else hit.final_normalized_score


@pytest.mark.parametrize("rank_by", ["normalized", "score"])
def test_index_answers_agree_with_exhaustive(db, every_row, rank_by):
    results = [db.query(q["prompt"], q["completion"], k=10, candidates=64, rank_by=rank_by) for q in QUERIES]
    assert {r.mode for r in results} == {"index"}
    recalls = [len(set(_ids(r.hits)) & set(_ids(t.hits[:10]))) / 10 for r, t in zip(results, every_row[rank_by])]
    assert sum(recalls) / len(recalls) >= 0.9, recalls
    for result in results:
        keys = [_ranked_by(h, rank_by) for h in result.hits]
        assert keys == sorted(keys, reverse=True)
        assert all(_ranked_by(h, "score") <= 0 for h in result.opponents)


def _all_stored_scores(db, queries):
    """(pairs, stored-row scores (Q, N), self-influence (N,)) of every row, scored straight from
    the row store."""
    import numpy as np

    from attribdb import layout
    from attribdb.rows import module_scores

    solved = db.engine.pipeline.gradients.solve(as_queries(queries))
    pairs, scores, squared = [], [], []
    for shard_id, reader in db.engine.store.shards.items():
        pairs += [(shard_id, row) for row in range(reader.rows)]
        payloads = reader.read(layout.ROWS)
        scores.append(module_scores(db.engine.runtime.row_layout, solved.blocks, payloads).sum(-1).double().numpy())
        squared.append(reader.read(layout.SELF_INFLUENCE).astype(np.float64))
    return pairs, np.concatenate(scores, axis=1), np.concatenate(squared), solved.row_self


@pytest.mark.parametrize("rank_by", ["normalized", "score"])
def test_rescore_0_answers_are_the_best_stored_scores_among_the_candidates(db, rank_by):
    """With every row a candidate, the top 10 is the top 10 of every stored row's score; with the
    default candidates (the sketches' best), most of it."""
    import numpy as np

    pairs, scores, squared, query_self = _all_stored_scores(db, QUERIES)
    keys = scores / np.sqrt(squared * query_self[:, None]) if rank_by == "normalized" else scores
    position = {pair: i for i, pair in enumerate(pairs)}
    every = db.query_batch(QUERIES, k=10, rank_by=rank_by, rescore=0, candidates=len(pairs))
    default = db.query_batch(QUERIES, k=10, rank_by=rank_by, rescore=0)
    held = []
    for result, found, key in zip(every, default, keys):
        got = key[[position[pair] for pair in _ids(result.hits)]]  # in the order the index returned them
        assert got == pytest.approx(np.sort(key)[::-1][:10], rel=1e-3, abs=1e-6)
        held.append(len(set(_ids(found.hits)) & set(_ids(result.hits))) / 10)
    assert np.mean(held) >= 0.9, held


def test_a_query_top_k_is_the_prefix_of_a_larger_k(db):
    small = db.query_batch(QUERIES, k=10)
    large = db.query_batch(QUERIES, k=100)
    for a, b in zip(small, large):
        assert _ids(a.hits) == _ids(b.hits)[:10]
        assert _ids(a.opponents) == _ids(b.opponents)[:len(a.opponents)]


def test_rescoring_every_candidate_gives_the_exhaustive_answer(db, every_row):
    results = db.query_batch(QUERIES, k=10, candidates=10_000, rescore=10_000)
    for result, truth in zip(results, every_row["normalized"]):
        top = truth.hits[:10]
        assert _ids(result.hits) == _ids(top)
        assert [h.exact_score for h in result.hits] == pytest.approx([h.score for h in top], rel=1e-4)
        assert [h.exact_normalized_score for h in result.hits] == pytest.approx(
            [h.normalized_score for h in top], rel=1e-4)
        assert result.rescored == db.engine.rows


def test_a_row_rescored_for_the_bottom_end_ranks_at_the_top_by_its_exact_score(db):
    """A candidate chosen for the opponents (compressed score -5) whose exact score is high (+10)
    is a top hit, ahead of a top candidate whose exact score is lower (+1), and no opponent."""
    import numpy as np

    from attribdb.query.scored import ScoredRows

    shard_id = next(iter(db.engine.store.shards))
    scored = ScoredRows(np.array([shard_id, shard_id]), np.array([0, 1]), np.array([5.0, -5.0]), np.zeros((2, 1)),
                     np.ones(2), query_self=1.0, exact_query_self=1.0)
    scored.exact[:] = True
    scored.exact_scores[:] = [1.0, 10.0]
    scored.exact_self_influence[:] = 1.0
    scored.chosen = {"top": np.array([True, False]), "bottom": np.array([False, True])}
    top, bottom = scored.ends(k=2, rank_by="score", opponents=True)
    hits, opponents = db.engine.pipeline.hits(scored, top), db.engine.pipeline.hits(scored, bottom)
    assert [(h.row, h.exact_score) for h in hits] == [(1, 10.0), (0, 1.0)]
    assert opponents == []


def test_opponents_recomputed_with_low_exact_scores_stay_out_of_the_top():
    """Two candidates recomputed for each end, six left with stored scores: the top is the two
    recomputed for it, then the best stored ones, not the two recomputed opponents (which once
    ranked ahead of every stored row and pushed true hits out of the top)."""
    import numpy as np

    from attribdb.query.scored import ScoredRows

    stored = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, -8.0, -9.0])
    scored = ScoredRows(np.zeros(8, np.int64), np.arange(8), stored, np.zeros((8, 1)), np.ones(8), query_self=1.0,
                        exact_query_self=1.0)
    recomputed = np.array([True, True, False, False, False, False, True, True])
    scored.exact[:] = recomputed
    scored.exact_scores[recomputed] = [8.5, 9.5, -7.0, -9.5]
    scored.exact_self_influence[:] = 1.0
    scored.chosen = {"top": np.arange(8) < 2, "bottom": np.arange(8) >= 6}
    top, bottom = scored.ends(k=5, rank_by="score", opponents=True)
    assert top.tolist() == [1, 0, 2, 3, 4]
    assert bottom.tolist() == [7, 6]


@pytest.mark.parametrize("budget, rescored", [(0.0, "none"), (1e30, "all")])
def test_default_rescoring_spends_the_compute_budget(db, monkeypatch, budget, rescored):
    import attribdb.query.recompute as recompute

    monkeypatch.setattr(recompute, "RESCORE_FLOPS", {"cpu": budget})
    result = db.query(**QUERIES[0], k=10, candidates=32)
    compressed = db.query(**QUERIES[0], k=10, candidates=32, rescore=0)
    if rescored == "none":
        assert result.rescored == 0 and _ids(result.hits) == _ids(compressed.hits)
        assert all(h.exact_score is None for h in result.hits)
    else:  # every candidate of both ends
        assert result.rescored == result.candidates and all(h.exact_score is not None for h in result.hits)


def test_normalized_ranking_agrees_with_exhaustive(db, every_row):
    truth = every_row["normalized"]
    results = [db.query(q["prompt"], q["completion"], k=10, candidates=64, rank_by="normalized") for q in QUERIES]
    for result in truth + results:
        values = [_ranked_by(h, "normalized") for h in result.hits]
        assert values == sorted(values, reverse=True)
        assert all(abs(v) <= 1 + 1e-6 for v in values)  # a cosine
    recalls = [len(set(_ids(r.hits)) & set(_ids(t.hits[:10]))) / 10 for r, t in zip(results, truth)]
    assert sum(recalls) / len(recalls) >= 0.8, recalls
    exact = db.exact(QUERIES[0]["prompt"], QUERIES[0]["completion"], k=5, rank_by="normalized")
    keys = [h.exact_normalized_score for h in exact.hits]
    assert keys == sorted(keys, reverse=True) and all(abs(k) <= 1 + 1e-6 for k in keys)
    with pytest.raises(QueryError, match="rank-by"):
        db.query("a", " b", rank_by="cosine")


def test_a_batch_dearer_than_an_exhaustive_pass_takes_it(db, every_row, monkeypatch):
    """On this tiny model recomputing every row once costs less than a batch's candidates: the
    batch is answered by the exhaustive pass (exact); with recomputation and scoring priced as
    dear as a large model's rows would make the pass, it stays in index mode."""
    batch = db.query_batch(QUERIES, k=10)
    assert {r.mode for r in batch} == {"exhaustive"}
    for result, truth in zip(batch, every_row["normalized"]):
        assert _ids(result.hits) == _ids(truth.hits[:10])
    recomputer = db.engine.pipeline.recomputer
    monkeypatch.setattr(type(recomputer), "exhaustive_flops", lambda self: 1e30)
    assert {r.mode for r in db.query_batch(QUERIES, k=10)} == {"index"}
    assert {r.mode for r in db.query_batch(QUERIES, k=10, rescore=3)} == {"index"}  # the caller's choice


def test_query_batch_equals_single_queries(db):
    batch = db.query_batch(QUERIES[:2], k=5, rescore=5)  # the index path, as single queries take it
    for item, result in zip(QUERIES[:2], batch):
        single = db.query(item["prompt"], item["completion"], k=5, rescore=5)
        assert _ids(single.hits) == _ids(result.hits)
        assert [h.score for h in single.hits] == pytest.approx([h.score for h in result.hits], rel=1e-4)


def test_exact_mode_equals_exhaustive_scores_and_token_contributions_sum(db, every_row):
    exact = db.exact(QUERIES[0]["prompt"], QUERIES[0]["completion"], k=5)
    assert exact.mode == "exact"
    truth = {(h.shard, h.row): h.score for h in every_row["normalized"][0].hits}
    for hit in exact.hits + exact.opponents:
        assert hit.exact_score == pytest.approx(truth[(hit.shard, hit.row)], rel=1e-4, abs=1e-6)
        assert sum(hit.token_contributions) == pytest.approx(hit.exact_score, rel=1e-6, abs=1e-9)
        assert len(hit.tokens) == len(hit.token_contributions) == hit.token_span[1] - hit.token_span[0]


def test_self_influence_outliers_are_sorted(db):
    top = db.self_influence(top=5)
    values = [h.self_influence for h in top]
    assert values == sorted(values, reverse=True) and len(values) == 5


def test_result_objects_convert(db):
    result = db.query(**QUERIES[1], k=3)
    frame = result.to_pandas()
    assert list(frame["kind"]).count("hit") == 3 and "score" in frame.columns
    assert json.loads(result.to_json())["hits"][0]["doc_id"] == result.hits[0].doc_id


def test_cli_json_carries_every_field(db_path, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in QUERIES[:2]) + "\n")
    out = cli_here("query", db_path, "--queries", queries, "--format", "json", "-k", "3").stdout
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert len(objects) == 2
    for obj in objects:
        assert {"prompt", "completion", "mode", "hits", "opponents", "query_self_influence", "candidates",
                "timings_ms"} <= set(obj)
        assert {"total", "gradient", "search", "rescore"} <= set(obj["timings_ms"])
        hit = obj["hits"][0]
        assert {"rank", "score", "normalized_score", "self_influence", "module_scores", "doc_id", "source",
                "token_span", "char_span", "text", "shard", "row"} <= set(hit)
        assert len(hit["module_scores"]) == 8


def test_cli_table_shows_ranks_and_snippets(db_path):
    out = cli_here("query", db_path, "--prompt", "the cat sat", "--completion", " near the river", "-k", "4").stdout
    assert "most influential" in out and "    1 " in out and "doc" in out


def test_shell_reads_queries_and_commands_line_by_line(db):
    """The shell's loop on piped input, in this process (the console process is the slow test below)."""
    from attribdb.query.shell import run_shell

    script = "the cat sat || near the river\n:k 2\n:mode exact\nred blue || green small\nno separator\n:bogus\n:q\n"
    out = io.StringIO()
    assert run_shell(db, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert text.count("most influential") == 2 and "k=2 mode=exact format=table" in text
    assert "separate prompt and completion with ||" in text and "unknown command ':bogus'" in text
    second = text.split("most influential")[2]
    assert "    2 " in second and "    3 " not in second.split("most negative")[0] and "exact, " in text


@pytest.mark.slow
def test_shell_answers_two_queries_in_one_process(db_path):
    script = "the cat sat || near the river\n:k 2\nred blue || green small\n:quit\n"
    result = subprocess.run([sys.executable, "-m", "attribdb", "shell", str(db_path)], input=script,
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("most influential") == 2
    second = result.stdout.split("most influential")[2]
    assert "    2 " in second and "    3 " not in second.split("most negative")[0]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "the cat", "--completion", "  "], "completion is empty"),
    (["--prompt", "the cat " * 80, "--completion", " sat"], "the model takes at most"),
    (["--prompt", "the cat"], "give --prompt and --completion"),
])
def test_bad_queries_get_one_clear_line(db_path, args, message):
    result = cli_here("query", db_path, *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_unknown_database_and_model_mismatch_are_clear(db_path, tmp_path, other_model_dir):
    missing = cli_here("query", tmp_path / "nope", "--prompt", "a", "--completion", " b")
    assert missing.returncode == 1 and "not an attribdb database" in missing.stderr
    with pytest.raises(StoreError):
        api.open(tmp_path / "nope")
    moved = copy_manifest(db_path, tmp_path / "db")  # the model is refused before anything else is read
    def point_at_other_model(manifest):
        manifest["model"]["path"] = manifest["settings"]["model_path"] = str(other_model_dir)
    rewrite_manifest(moved, point_at_other_model)
    mismatch = cli_here("query", moved, "--prompt", "a", "--completion", " b")
    assert mismatch.returncode == 1 and "differ from the model" in mismatch.stderr
    with pytest.raises(ModelMismatchError):
        api.open(moved).query("a", " b")


def test_empty_completion_raises_in_python(db):
    with pytest.raises(QueryError):
        db.query("the cat", "")
