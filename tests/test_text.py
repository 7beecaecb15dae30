"""The full-text index: built, resumed, appended and verified with the database; BM25 text mode and
the BM25 prefilter of exact influence, through the API and the CLI."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

import attribdb.api as api
from attribdb import layout, text_index
from attribdb.shard import TEXT_CRC_KEY, file_crc32c

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, assert_same_database, cli, cli_here, copy_db, edit_lmdb, one_line_error

RARE = "zyzzyva"
STRANGE_QUERIES = ['"', "'", '"unbalanced', "AND", "OR NOT", "(", "a) OR (b", "cat*", "^the", "NEAR(cat dog)",
                   "body:cat", "-cat +dog", "\x00", "\ud800 lone surrogate", "", "   ", "🙂 émoji naïve", "a\"b'c",
                   "{x} [y] <z> ; -- DROP TABLE rows_text", "\\", "%_"]


def write_text_corpus(path: Path) -> Path:
    """The shared test corpus plus three short documents that hold a word no other does."""
    write_corpus(path, 60, seed=7)
    with open(path, "a") as handle:
        for i, text in enumerate([f"the {RARE} sat near the river.", f"a red {RARE} flew.", f"{RARE.upper()} ran."]):
            handle.write(json.dumps({"id": f"rare{i}", "text": text}) + "\n")
    return path


def build_command(db: Path, corpus: Path, model_dir: Path) -> list:
    return ["build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "corpus.jsonl")


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, text_corpus, model_dir) -> Path:
    db = tmp_path_factory.mktemp("textdb") / "db"
    cli(*build_command(db, text_corpus, model_dir))
    return db


@pytest.fixture(scope="module")
def db(db_path):
    with api.open(db_path) as database:
        yield database


def all_texts(database) -> dict[tuple[int, int], str]:
    readers = database.text_search.readers
    return {(shard_id, row): record.text for shard_id, reader in readers.items()
            for row, record in enumerate(reader.metadata(range(reader.rows)))}


def test_every_shard_stores_a_text_index_of_its_rows(db_path, db):
    texts = all_texts(db)
    assert len(texts) > 100 and len(db.text_search.readers) > 3
    for shard_id, reader in db.text_search.readers.items():
        assert reader.has_text_index and (layout.shard_dir(db_path, shard_id) / layout.TEXT_FILE).is_file()
        assert db.text_search.indexes[shard_id].rows == reader.rows


def test_bm25_top_hits_for_a_rare_word_are_the_rows_holding_it(db):
    holding = {pair for pair, text in all_texts(db).items() if re.search(rf"\b{RARE}\b", text, re.IGNORECASE)}
    assert len(holding) == 3
    result = db.text(f"where did the {RARE}", k=10)
    assert result.mode == "text" and not result.opponents
    assert {(h.shard, h.row) for h in result.hits[:3]} == holding
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and scores[2] > scores[3]
    assert all(h.bm25 == h.score and h.normalized_score is None for h in result.hits)
    assert [h.rank for h in result.hits] == list(range(1, 11))
    assert {(h.shard, h.row) for h in db.text(RARE, k=10).hits} == holding  # no other row holds a term


def test_bm25_over_shards_equals_fts5_bm25_of_one_index_of_every_row(db):
    """Statistics summed over shards: each row scores as in one FTS5 index of the whole database,
    so the ranking does not depend on how rows were sharded."""
    texts = all_texts(db)
    pairs = sorted(texts)
    whole = sqlite3.connect(":memory:")
    whole.execute(f"CREATE VIRTUAL TABLE t USING fts5(body, tokenize='{text_index.TOKENIZER}')")
    whole.executemany("INSERT INTO t(rowid, body) VALUES (?, ?)", [(i, texts[p]) for i, p in enumerate(pairs)])
    query = "the cat sat near the river"
    expression = " OR ".join(f'"{term}"' for term in db.text_search.terms(query))
    expected = whole.execute("SELECT rowid, -bm25(t) FROM t WHERE t MATCH ? ORDER BY rank", (expression,)).fetchall()
    result = db.text(query, k=len(pairs))
    assert result.candidates == len(expected)
    got = {(h.shard, h.row): h.score for h in result.hits}
    assert got == pytest.approx({pairs[i]: score for i, score in expected}, rel=1e-9)


def test_terms_in_more_than_half_the_rows_count_only_when_nothing_else_matches():
    """FTS5 floors their weight at 10⁻⁶; leaving them out moves a score by a few millionths at most."""
    rows = [(0, "common rare"), (1, "common"), (2, "common other"), (3, "other words")]
    index = text_index.TextIndex.in_memory(rows, "test")
    fts5 = {row: -score for row, score in index.connection.execute(
        f"SELECT rowid, bm25({text_index.TABLE}) FROM {text_index.TABLE} WHERE {text_index.TABLE} MATCH "
        "'\"common\" OR \"rare\"'")}
    found, matched = text_index.bm25_top({0: index}, ["common", "rare"], 10)
    assert matched == 1 and [(shard, row) for _, shard, row in found] == [(0, 0)]
    assert found[0][0] == pytest.approx(fts5[0], abs=1e-5)
    found, matched = text_index.bm25_top({0: index}, ["common"], 10)
    assert matched == 3 and [row for _, _, row in found] == [1, 0, 2]  # the shorter row first, as in FTS5
    index.close()


RARE_QUERY = (f"the {RARE} sat near", " the river")


@pytest.fixture(scope="module")
def rare_truth(db):
    """Every row's exact scores for RARE_QUERY, from one exhaustive pass."""
    return db.exhaustive([RARE_QUERY], k=10_000)[0]


def test_prefilter_scores_are_the_exhaustive_scores_of_the_bm25_top_n(db, rare_truth):
    prompt, completion = RARE_QUERY
    bm25 = db.text(prompt, completion, k=20)
    result = db.prefilter(prompt, completion, n=20, k=20)
    assert result.mode == "prefilter" and result.candidates == result.rescored == 20
    assert {(h.shard, h.row) for h in result.hits} == {(h.shard, h.row) for h in bm25.hits}
    assert {(h.shard, h.row): h.bm25 for h in result.hits} == {(h.shard, h.row): h.score for h in bm25.hits}
    truth = rare_truth
    exhaustive = {(h.shard, h.row): h for h in truth.hits}
    assert result.query_self_influence == pytest.approx(truth.query_self_influence, rel=1e-5)
    # float32 sums over batches of other rows and padding: equal to 1e-4 of the largest score
    scale = max(abs(h.score) for h in truth.hits)
    for hit in result.hits + result.opponents:
        same = exhaustive[(hit.shard, hit.row)]
        assert hit.exact_score == pytest.approx(same.score, rel=1e-4, abs=1e-4 * scale)
        assert hit.exact_normalized_score == pytest.approx(same.normalized_score, rel=1e-4, abs=1e-5)
        assert sum(hit.token_contributions) == pytest.approx(hit.exact_score, rel=1e-4, abs=1e-4 * scale)
    keys = [h.exact_normalized_score for h in result.hits]
    assert keys == sorted(keys, reverse=True)
    assert all(h.exact_score < 0 for h in result.opponents)
    by_score = db.prefilter(prompt, completion, n=20, k=5, rank_by="score")
    assert [h.exact_score for h in by_score.hits] == sorted((h.exact_score for h in result.hits), reverse=True)[:5]


def test_reciprocal_rank_fusion_sums_one_over_c_plus_rank_and_breaks_ties_by_first_appearance():
    from attribdb.query.text import reciprocal_rank_fusion

    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "b", "a", "d"]], c=60)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]  # a and c tie: a comes first in the first ranking
    assert dict(fused) == pytest.approx({"a": 1 / 61 + 1 / 63, "b": 2 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 64})
    assert [item for item, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]], c=1)] == ["x", "y"]


def test_hybrid_prefilter_is_the_rank_fusion_of_bm25_and_exhaustive_influence(db, rare_truth):
    """--rank-by hybrid against the fusion computed here from text mode's BM25 order and the
    exhaustive pass's normalized scores of the same rows."""
    (prompt, completion), n, k, c = RARE_QUERY, 20, 8, 60
    text_order = [(h.shard, h.row) for h in db.text(prompt, completion, k=n).hits]
    truth = {(h.shard, h.row): h for h in rare_truth.hits}
    cosine = sorted(truth[row].normalized_score for row in text_order)
    assert min(b - a for a, b in zip(cosine, cosine[1:])) > 1e-4  # no near-tie the two computations could order apart
    influence_order = sorted(text_order, key=lambda row: -truth[row].normalized_score)
    expected = {row: 1 / (c + text_order.index(row) + 1) + 1 / (c + influence_order.index(row) + 1)
                for row in text_order}
    best = sorted(text_order, key=lambda row: (-expected[row], text_order.index(row)))[:k]
    result = db.prefilter(prompt, completion, n=n, k=k, rank_by="hybrid")
    assert result.mode == "hybrid" and result.candidates == result.rescored == n
    assert [(h.shard, h.row) for h in result.hits] == best and [h.rank for h in result.hits] == list(range(1, k + 1))
    assert [h.fused for h in result.hits] == pytest.approx([expected[row] for row in best], rel=1e-12)
    assert [(h.shard, h.row) for h in result.hits] != influence_order[:k]  # the fusion changed the order here
    scale = max(abs(h.score) for h in truth.values())
    for hit in result.hits + result.opponents:
        assert hit.exact_score == pytest.approx(truth[(hit.shard, hit.row)].score, rel=1e-4, abs=1e-4 * scale)
        assert hit.bm25 > 0 and hit.token_contributions is None
    plain = db.prefilter(prompt, completion, n=n, k=k)
    assert [(h.shard, h.row) for h in result.opponents] == [(h.shard, h.row) for h in plain.opponents]


@pytest.mark.slow
def test_a_kill_between_writing_the_indexes_and_sealing_resumes_to_the_same_text_index(
        tmp_path, text_corpus, model_dir, db_path):
    db = tmp_path / "db"
    killed = cli(*build_command(db, text_corpus, model_dir), env_extra={"ATTRIBDB_KILL_AT": "indexes-written:2"},
                 check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (layout.shard_dir(db, 1) / layout.TEXT_FILE).is_file()  # written, but the shard is not sealed
    assert cli_here("verify", db).returncode == 3
    cli(*build_command(db, text_corpus, model_dir))
    assert_same_database(db, copy_db(db_path, tmp_path / "reference"))  # text.sqlite byte for byte among the rest
    # (a copy: this process holds the reference's LMDB open, and LMDB refuses a second open)


@pytest.mark.slow
def test_append_adds_its_rows_to_the_text_index(tmp_path, text_corpus, model_dir):
    db = tmp_path / "db"
    cli(*build_command(db, text_corpus, model_dir))
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"id": f"new{i}", "text": f"the quokka sat {i}."}) + "\n" for i in range(3)))
    before = api.open(db)
    assert before.text("quokka", k=5).hits == []
    first_new_shard = max(before.text_search.readers) + 1
    before.close()
    cli("append", db, "--corpus", extra, "--quiet")
    assert cli_here("verify", db).returncode == 0
    with api.open(db) as after:
        hits = after.text("quokka", k=5).hits
        assert {h.doc_id for h in hits} == {"new0", "new1", "new2"} and {h.shard for h in hits} == {first_new_shard}
        assert {h.doc_id for h in after.text(RARE, k=3).hits} == {"rare0", "rare1", "rare2"}  # the old rows stay


def _replace_text_index(db: Path, shard: int, data: bytes, record_crc: bool) -> None:
    path = layout.shard_dir(db, shard) / layout.TEXT_FILE
    path.write_bytes(data)
    if record_crc:
        edit_lmdb(layout.shard_dir(db, shard), layout.INFO_DB,
                  lambda txn, info: txn.put(TEXT_CRC_KEY, file_crc32c(path), db=info))


def test_verify_catches_a_damaged_missing_or_foreign_text_index(tmp_path, db_path):
    text_of = lambda shard: (layout.shard_dir(db_path, shard) / layout.TEXT_FILE).read_bytes()  # noqa: E731
    flipped = bytearray(text_of(1))
    flipped[len(flipped) // 2] ^= 0x20
    cases = [
        ("flipped", lambda db: _replace_text_index(db, 1, bytes(flipped), False), ["00001", "fails its checksum"]),
        ("missing", lambda db: (layout.shard_dir(db, 1) / layout.TEXT_FILE).unlink(), ["00001", "is missing"]),
        ("garbage", lambda db: _replace_text_index(db, 1, b"not sqlite" * 100, True), ["00001", "text index"]),
        # a whole index with its checksum recorded, of another shard's rows: only verify compares the text
        ("foreign", lambda db: _replace_text_index(db, 1, text_of(2), True), ["shard 00001", "text index differs"]),
    ]
    for name, damage, fragments in cases:
        db = copy_db(db_path, tmp_path / name)
        damage(db)
        one_line_error(cli_here("verify", db), *fragments)
        if name != "foreign":
            one_line_error(cli_here("query", db, "--mode", "text", "--prompt", "the cat"), "00001")


def test_a_database_built_before_text_indexes_answers_text_queries_from_memory(tmp_path, db_path, db):
    old = copy_db(db_path, tmp_path / "old")
    for shard in (old / layout.SHARDS_DIR).iterdir():
        (shard / layout.TEXT_FILE).unlink()
        edit_lmdb(shard, layout.INFO_DB, lambda txn, info: txn.delete(TEXT_CRC_KEY, db=info))
    assert cli_here("verify", old).returncode == 0
    result = cli_here("query", old, "--mode", "text", "--prompt", RARE, "--format", "json")
    assert result.returncode == 0 and "built before attribdb indexed text" in result.stderr
    hits = json.loads(result.stdout)["hits"]
    expected = db.text(RARE, k=10).hits
    assert [(h["shard"], h["row"], h["score"]) for h in hits] == [(h.shard, h.row, h.score) for h in expected]


def test_cli_text_mode_prints_bm25_matches(db_path):
    table = cli_here("query", db_path, "--mode", "text", "--prompt", f"a {RARE}", "-k", "3")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"query: 'a {RARE}' → ''  [text, ") and lines[1] == "best text matches (BM25):"
    assert lines[2].split() == ["rank", "score", "norm", "document", "text"]
    assert all(line.split()[2] == "-" and "rare" in line.split()[3] for line in lines[3:6]) and len(lines) == 6
    out = cli_here("query", db_path, "--mode", "text", "--prompt", "the cat", "--completion", " sat",
                   "--bm25-query", "prompt", "--format", "json", "-k", "4").stdout
    obj = json.loads(out)
    assert obj["mode"] == "text" and len(obj["hits"]) == 4 and obj["hits"][0]["bm25"] == obj["hits"][0]["score"]


def test_cli_prefilter_and_its_option_errors(db_path):
    out = cli_here("query", db_path, "--prompt", f"the {RARE}", "--completion", " sat", "--prefilter", "bm25:8",
                   "--format", "json", "-k", "3").stdout
    obj = json.loads(out)
    assert obj["mode"] == "prefilter" and obj["candidates"] == 8 and len(obj["hits"]) == 3
    assert all(h["exact_score"] is not None and h["tokens"] and h["bm25"] > 0 for h in obj["hits"])
    for bad in ("bm25", "bm25:0", "bm25:-3", "tfidf:10", "bm25:ten"):
        refused = cli_here("query", db_path, "--prompt", "a", "--completion", " b", "--prefilter", bad)
        assert refused.returncode == 2 and "bm25:N" in refused.stderr, bad
    mixed = cli_here("query", db_path, "--prompt", "a", "--completion", " b", "--prefilter", "bm25:5", "--mode", "text")
    assert mixed.returncode == 2 and "does not go with --mode text" in mixed.stderr
    out = cli_here("query", db_path, "--prompt", f"the {RARE}", "--completion", " sat", "--prefilter", "bm25:8",
                   "--rank-by", "hybrid", "--format", "json", "-k", "3").stdout
    obj = json.loads(out)
    assert obj["mode"] == "hybrid" and [h["rank"] for h in obj["hits"]] == [1, 2, 3]
    fused = [h["fused"] for h in obj["hits"]]
    assert fused == sorted(fused, reverse=True) and all(h["bm25"] > 0 for h in obj["hits"])
    alone = cli_here("query", db_path, "--prompt", "a", "--completion", " b", "--rank-by", "hybrid")
    assert alone.returncode == 2 and "give --prefilter bm25:N" in alone.stderr


@pytest.mark.parametrize("text", STRANGE_QUERIES)
def test_any_query_text_is_searched_without_an_error(db, text):
    result = db.text(text, " " + text, k=5)
    assert len(result.hits) <= 5
    assert db.prefilter(text, " sat", n=5, k=2, bm25_query="prompt").candidates <= 5


def test_strange_query_text_through_the_cli(db_path):
    for text in ('"unbalanced AND (', "NEAR(cat dog) OR body:*", "🙂 ^"):
        result = cli_here("query", db_path, "--mode", "text", "--prompt", text)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (text, result.stderr)
