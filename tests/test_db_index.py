"""The database-wide FAISS index: the auto rule, recall against brute force, verify, append, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from attribdb import db_index, layout
from attribdb.manifest import Manifest
from attribdb.shard import ShardReader

from conftest import write_corpus
from dbtools import cli, copy_db

SETTINGS = ["--max-length", "16", "--shard-size", "512", "--commit-rows", "64", "--batch-size", "64",
            "--fit-sample-size", "48", "--row-bytes", "512"]


def test_the_auto_rule_picks_the_kinds_as_documented():
    assert not db_index.wanted("auto", db_index.AUTO_MIN_ROWS - 1)
    assert db_index.wanted("auto", db_index.AUTO_MIN_ROWS) and db_index.database_kind("auto") == "pq4"
    for kind in ("pq4", "ivf-sq8"):
        assert db_index.wanted(kind, 1) and db_index.wanted(kind, 10 ** 7) and db_index.database_kind(kind) == kind
    for kind in ("flat", "hnsw", "ivf"):
        assert not db_index.wanted(kind, 10 ** 7) and db_index.database_kind(kind) is None
    assert db_index.list_count(10 ** 6) == 1000 and db_index.list_count(1000) == 1000 // db_index.TRAIN_POINTS_PER_LIST
    assert db_index.nprobe_for(1000) >= db_index.MIN_NPROBE and db_index.nprobe_for(10) == 10


@pytest.fixture(scope="module")
def ivf_db(tmp_path_factory, model_dir) -> Path:
    """A database whose every query goes through a database index (pq4) at 2,400 documents."""
    corpus = write_corpus(tmp_path_factory.mktemp("ivf") / "corpus.jsonl", 2400, seed=5)
    db = tmp_path_factory.mktemp("ivf") / "db"
    built = cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SETTINGS, "--index-kind", "pq4")
    assert built.stderr == "", f"--quiet leaves stderr empty (FAISS's training warnings included):\n{built.stderr}"
    return db


def _brute_force_scores(db: Path, query_rows: np.ndarray) -> dict:
    """(shard, row) → (Q,) inner products of the query rows with every stored unit row."""
    manifest = Manifest.load(db)
    out = {}
    for shard_id in manifest.shard_ids:
        reader = ShardReader(layout.shard_dir(db, shard_id), manifest.row_layout())
        scores = query_rows @ reader.read(layout.ROWS, np.arange(reader.rows)).astype(np.float32).T
        out |= {(shard_id, r): scores[:, r] for r in range(reader.rows)}
        reader.close()
    return out


def recall_at(results, scores: dict, k: int) -> float:
    """Share of the true top k found, counting a hit whose true score ties the k-th best as found
    (short windows repeat in this corpus, and identical rows tie)."""
    found = []
    for i, result in enumerate(results):
        kth = np.sort([s[i] for s in scores.values()])[-k]
        found.append(sum(scores[(h.shard, h.row)][i] >= kth - 1e-6 for h in result.hits[:k]) / k)
    return float(np.mean(found))


def _queries(n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    words = "the cat dog bird sat ran flew over under near house tree river stone".split()
    return [(" ".join(rng.choice(words, 4)), " " + " ".join(rng.choice(words, 2))) for _ in range(n)]


def _answers_and_rows(db_path: Path, queries):
    """Index answers (``rescore=0``: the index's answer, not its exact rescoring) and query rows."""
    import attribdb
    from attribdb.query.options import Query

    with attribdb.open(db_path) as db:
        engine = db.engine
        assert engine.store.indexes.database is not None and not engine.store.indexes.shard_indexes
        results = db.query_batch(queries, k=10, rescore=0)
        return results, engine.query_rows([Query(*q) for q in queries]).float().numpy()


def _update_index(db: Path, manifest: Manifest) -> bool:
    """db_index.update as the end of a build runs it, with a reader of every shard."""
    readers = {s: ShardReader(layout.shard_dir(db, s), manifest.row_layout()) for s in manifest.shard_ids}
    try:
        return db_index.update(db, manifest, readers)
    finally:
        for reader in readers.values():
            reader.close()


def test_a_database_index_added_to_a_small_database_answers_like_brute_force(tmp_path, built_db):
    """The quick check of the database index (the tests below build 2,400 documents): pq4 over a copy
    of the shared test database serves every query, as brute force over the stored rows would."""
    db = copy_db(built_db, tmp_path / "db")
    manifest = Manifest.load(db)
    manifest.settings = dataclasses.replace(manifest.settings, index_kind="pq4")
    assert _update_index(db, manifest)
    results, query_rows = _answers_and_rows(db, _queries(5))
    assert recall_at(results, _brute_force_scores(db, query_rows), 10) == 1.0


@pytest.mark.slow
def test_a_pq4_database_answers_like_brute_force_over_its_rows(ivf_db):
    recorded = Manifest.load(ivf_db).database_index
    assert recorded["kind"] == "pq4" and recorded["rows"] > 3000
    results, query_rows = _answers_and_rows(ivf_db, _queries(40))
    assert recall_at(results, _brute_force_scores(ivf_db, query_rows), 10) >= 0.95


@pytest.mark.slow
def test_pq4_re_ranking_every_row_is_brute_force(ivf_db):
    """Re-ranked from every row's float16 copy, the database index's candidates are brute force's:
    the same rows in the same order, with the same scores up to float32 summation order."""
    import attribdb
    from attribdb.native import faiss
    from attribdb.query.options import Query

    with attribdb.open(ivf_db) as db:
        indexes = db.engine.store.indexes
        faiss.downcast_index(indexes.database.index).k_factor = indexes.database.ntotal  # every row re-ranked
        query_rows = db.engine.query_rows([Query(*q) for q in _queries(20)]).float().numpy()
        found = indexes.search(query_rows, 50)
    truth = _brute_force_scores(ivf_db, query_rows)
    pairs = list(truth)
    scores = np.stack([truth[p] for p in pairs], axis=1)  # (Q, rows)
    for i, hits in enumerate(found):
        assert len(hits) == 50
        assert np.allclose([s for s, _, _ in hits], -np.sort(-scores[i])[:50], atol=1e-5)
        for score, shard, row in hits:
            assert np.isclose(truth[(shard, row)][i], score, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pq4_keeps_the_stored_rows_bit_for_bit(ivf_db):
    """The engine scores candidates from the database index's float16 copies instead of the row store."""
    import attribdb

    with attribdb.open(ivf_db) as db:
        engine = db.engine
        shards = np.repeat(sorted(engine.store.shards), 3)
        rows = np.tile([0, 5, 9], len(engine.store.shards))
        held = engine.store.indexes.stored_rows(shards, rows, engine.runtime.row_layout.dim)
        readers = engine.store.shards
        expected = np.concatenate([readers[s].read(layout.ROWS, np.array([r])) for s, r in zip(shards, rows)])
        assert held.dtype == np.float16 and np.array_equal(held, expected)
        assert engine.store.indexes.stored_rows(shards[:1], np.array([10 ** 6]), 1) is None  # not in the index


@pytest.mark.slow
def test_an_ivf_sq8_index_is_replaced_by_pq4_when_the_settings_want_it(tmp_path, model_dir):
    """A database built with ivf-sq8 (as auto built before pq4) answers through it; once its settings
    ask for pq4, the next update replaces it with one over every shard, and verify passes."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 400, seed=7)
    db = tmp_path / "db"
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SETTINGS, "--index-kind", "ivf-sq8")
    manifest = Manifest.load(db)
    assert manifest.database_index["kind"] == "ivf-sq8" and manifest.database_index["nprobe"] >= 1
    queries = _queries(10)
    results, query_rows = _answers_and_rows(db, queries)
    assert recall_at(results, _brute_force_scores(db, query_rows), 10) >= 0.95
    manifest.settings = dataclasses.replace(manifest.settings, index_kind="pq4")
    assert _update_index(db, manifest)
    recorded = Manifest.load(db).database_index
    assert recorded["kind"] == "pq4" and recorded["shards"] == manifest.shard_ids
    assert sorted(p.name for p in (db / layout.INDEX_DIR).iterdir()) == [recorded["file"]]
    assert "ok:" in cli("verify", db).stdout
    results, _ = _answers_and_rows(db, queries)
    assert recall_at(results, _brute_force_scores(db, query_rows), 10) >= 0.95


@pytest.mark.slow
def test_verify_checks_the_database_index(tmp_path, ivf_db):
    assert "ok:" in cli("verify", ivf_db).stdout
    db = shutil.copytree(ivf_db, tmp_path / "db")
    index_file = db / layout.INDEX_DIR / Manifest.load(db).database_index["file"]
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    index_file.write_bytes(bytes(data))
    result = cli("verify", db, check=False)
    assert result.returncode == 1 and "fails its checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_verify_finds_database_index_copies_that_differ_from_the_rows(tmp_path, ivf_db):
    """An index whose checksum holds but whose float16 copy of a row is another row (what a bug in
    building it would leave) fails verify: queries would score candidates from those copies."""
    from attribdb.faiss_index import write_index

    db = shutil.copytree(ivf_db, tmp_path / "db")
    manifest = Manifest.load(db)
    recorded = manifest.database_index
    readers = {s: ShardReader(layout.shard_dir(db, s), manifest.row_layout()) for s in recorded["shards"]}
    try:
        index = db_index._trained("pq4", readers, sum(r.rows for r in readers.values()))
        for shard_id, reader in readers.items():
            vectors = reader.faiss_vectors()
            if shard_id == recorded["shards"][-1]:
                vectors[[0, 1]] = vectors[[1, 0]]  # two rows' copies swapped
            index.add_with_ids(vectors, db_index.global_ids(shard_id, reader.rows))
    finally:
        for reader in readers.values():
            reader.close()
    path = db / layout.INDEX_DIR / recorded["file"]
    write_index(index, path)
    manifest.database_index = recorded | {"crc32c": db_index._file_crc32c(path)}
    manifest.save(db)
    result = cli("verify", db, check=False)
    assert result.returncode == 1 and "differs from its rows" in result.stderr
    assert f"shard {recorded['shards'][-1]:05d}" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_index_lost_before_the_manifest_recorded_it_is_rebuilt_the_same(tmp_path, ivf_db, model_dir):
    """A build killed after its shards sealed but before the manifest named the database index
    leaves the shards searchable on their own; running it again writes the same index."""
    db = shutil.copytree(ivf_db, tmp_path / "db")
    manifest = Manifest.load(db)
    recorded = manifest.database_index
    manifest.database_index = None
    manifest.generations[0].state = "building"
    manifest.save(db)
    (db / layout.INDEX_DIR / recorded["file"]).rename(db / layout.INDEX_DIR / "leftover.faiss.tmp")
    import attribdb

    with attribdb.open(db) as opened:  # meanwhile: every shard through its own index
        assert opened.engine.store.indexes.database is None and len(opened.engine.store.indexes.shard_indexes) > 1
    corpus = Manifest.load(ivf_db).generations[0].corpus["path"]
    cli("build", db, "--corpus", corpus, "--quiet")
    rebuilt = Manifest.load(db).database_index
    assert rebuilt == recorded and sorted(p.name for p in (db / layout.INDEX_DIR).iterdir()) == [recorded["file"]]


@pytest.mark.slow
def test_append_adds_its_shards_to_the_database_index(tmp_path, ivf_db):
    from attribdb.faiss_index import read_index
    from attribdb.native import faiss

    db = shutil.copytree(ivf_db, tmp_path / "db")
    before = Manifest.load(db).database_index

    def codebook(recorded):
        index = read_index(db / layout.INDEX_DIR / recorded["file"])  # IDMap → Refine → PQ fast-scan
        return faiss.vector_to_array(faiss.downcast_index(faiss.downcast_index(index.index).base_index).pq.centroids)

    trained = codebook(before)
    more = write_corpus(tmp_path / "more.jsonl", 300, seed=6, start=5000)
    cli("append", db, "--corpus", more, "--quiet")
    manifest = Manifest.load(db)
    after = manifest.database_index
    assert after["shards"] == manifest.shard_ids and np.array_equal(codebook(after), trained)  # trained once
    info = json.loads(cli("info", db, "--json").stdout)
    assert after["rows"] == info["sequences"] > before["rows"]
    assert "ok:" in cli("verify", db).stdout
