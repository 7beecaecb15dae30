"""The database index: codes only, candidates as brute force finds them, verify, append, retraining,
and index files that stay while a reader may need them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from attribdb import db_index, layout
from attribdb.manifest import Manifest
from attribdb.shard import ShardReader

from conftest import write_corpus
from dbtools import cli, cli_here, copy_db

SETTINGS = ["--max-length", "16", "--shard-size", "512", "--commit-rows", "64", "--batch-size", "64",
            "--fit-sample-size", "48", "--row-bytes", "2048"]
DEFAULT_CANDIDATES = 128  # query/engine.py: what a query asks the index for, per end


def test_the_auto_rule_picks_the_kinds_as_documented():
    assert not db_index.wanted("auto", db_index.AUTO_MIN_BYTES - 1)
    assert db_index.wanted("auto", db_index.AUTO_MIN_BYTES)
    assert db_index.wanted("pq4", 1) and not db_index.wanted("flat", 10 ** 15)


@pytest.fixture(scope="module")
def pq4_db(tmp_path_factory, model_dir) -> Path:
    """A database whose every query goes through a database index (pq4) at 600 documents (about
    4,900 windows of 16 tokens: a fast-scan index of 4-bit codes over thousands of rows)."""
    corpus = write_corpus(tmp_path_factory.mktemp("pq4") / "corpus.jsonl", 600, seed=5)
    db = tmp_path_factory.mktemp("pq4") / "db"
    built = cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SETTINGS, "--index-kind", "pq4")
    assert built.stderr == "", f"--quiet leaves stderr empty (FAISS's training warnings included):\n{built.stderr}"
    return db


def _projection(db: Path):
    from attribdb.rows import RowProjection

    return RowProjection.load(layout.projection_path(db), Manifest.load(db).row_layout())


def _stored(db: Path) -> tuple[list, np.ndarray]:
    """(shard, row) of every stored row, and their index vectors (sketches made from their payloads)."""
    manifest, projection = Manifest.load(db), _projection(db)
    pairs, vectors = [], []
    for shard_id in manifest.shard_ids:
        reader = ShardReader(layout.shard_dir(db, shard_id), manifest.row_layout())
        pairs += [(shard_id, r) for r in range(reader.rows)]
        vectors.append(reader.faiss_vectors(projection))
        reader.close()
    return pairs, np.concatenate(vectors)


def _query_rows(db: Path, n: int) -> np.ndarray:
    """Both ends of ``n`` queries' sketches, as the engine searches them."""
    import attribdb
    from attribdb.query.options import Query

    rng = np.random.default_rng(0)
    words = "the cat dog bird sat ran flew over under near house tree river stone".split()
    queries = [Query(" ".join(rng.choice(words, 4)), " " + " ".join(rng.choice(words, 2))) for _ in range(n)]
    with attribdb.open(db) as opened:
        rows = opened.engine.query_sketches(queries).float().numpy()
    return np.concatenate([rows, -rows])


def recall_at_10(found: list, pairs: list, scores: np.ndarray) -> float:
    """Share of each query's true top 10 (brute force over the stored rows) among its candidates; a
    candidate whose true score ties the 10th best counts (short windows repeat, identical rows tie)."""
    index = {pair: i for i, pair in enumerate(pairs)}
    shares = []
    for hits, truth in zip(found, scores):
        tenth = np.sort(truth)[-10]
        held = sorted((truth[index[(shard, row)]] for _, shard, row in hits), reverse=True)[:10]
        shares.append(sum(score >= tenth - 1e-6 for score in held) / 10)
    return float(np.mean(shares))


def _candidates(db: Path, queries: np.ndarray, k: int = DEFAULT_CANDIDATES) -> list:
    """The index's candidates for query rows, through the database index (no shard scanned)."""
    from attribdb.db_index import open_searchable

    manifest = Manifest.load(db)
    readers, indexes = open_searchable(db, manifest, _projection(db))
    try:
        assert indexes.database is not None and not indexes.scanned
        return indexes.search(queries, k)
    finally:
        for reader in readers.values():
            reader.close()


def _assert_brute_force(db: Path, n: int, recall: float) -> None:
    """recall@10 of the default candidates against brute force over every stored row's sketch, and
    the candidates' scores the codes' estimates of their inner products."""
    pairs, vectors = _stored(db)
    queries = _query_rows(db, n)
    scores = np.pad(queries, ((0, 0), (0, vectors.shape[1] - queries.shape[1]))) @ vectors.T
    found = _candidates(db, queries)
    assert recall_at_10(found, pairs, scores) >= recall
    index = {pair: i for i, pair in enumerate(pairs)}
    for hits, truth in zip(found, scores):
        estimates = np.array([s for s, _, _ in hits])
        exact = np.array([truth[index[(shard, row)]] for _, shard, row in hits])
        assert np.corrcoef(estimates, exact)[0, 1] > 0.8  # among candidates alone: a narrow range


def test_a_database_index_added_to_a_small_database_finds_what_brute_force_finds(tmp_path, built_db):
    """The quick check (the tests below build 600 documents): a pq4 index over a copy of the shared
    test database serves every query as brute force over the stored rows would."""
    db = copy_db(built_db, tmp_path / "db")
    manifest = Manifest.load(db)
    manifest.settings = dataclasses.replace(manifest.settings, index_kind="pq4")
    readers = {s: ShardReader(layout.shard_dir(db, s), manifest.row_layout()) for s in manifest.shard_ids}
    try:
        assert db_index.update(db, manifest, readers, _projection(db))
    finally:
        for reader in readers.values():
            reader.close()
    _assert_brute_force(db, 5, 0.95)


@pytest.mark.slow
def test_the_database_index_finds_what_brute_force_over_the_rows_finds(pq4_db):
    assert Manifest.load(pq4_db).database_index["rows"] > 3000
    _assert_brute_force(pq4_db, 40, 0.95)


@pytest.mark.slow
def test_the_database_index_holds_codes_not_rows(pq4_db):
    """No second copy of a row: the index file holds codes of the rows' sketches, a fixed kilobyte
    whatever the row, from which the row cannot be had back."""
    manifest = Manifest.load(pq4_db)
    row_layout = manifest.row_layout()
    recorded = manifest.database_index
    per_row = (pq4_db / layout.INDEX_DIR / recorded["file"]).stat().st_size / recorded["rows"]
    codes = db_index.code_bytes(row_layout.index_dim)
    assert codes == row_layout.index_dim // 4 + 8  # 4 bits per 2 coordinates, and the id
    assert per_row < 1.5 * codes  # the codes, and the trained quantizers shared by every row


@pytest.mark.slow
def test_verify_checks_the_database_index(tmp_path, pq4_db):
    assert "ok:" in cli_here("verify", pq4_db, check=True).stdout
    db = shutil.copytree(pq4_db, tmp_path / "db")
    index_file = db / layout.INDEX_DIR / Manifest.load(db).database_index["file"]
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    index_file.write_bytes(bytes(data))
    result = cli_here("verify", db)
    assert result.returncode == 1 and "fails its checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_verify_finds_database_index_codes_that_differ_from_the_rows(tmp_path, pq4_db):
    """An index whose checksum holds but whose codes of two rows are swapped (what a bug in building
    it would leave) fails verify: those rows would be candidates for the wrong queries."""
    from attribdb.faiss_index import write_index

    db = shutil.copytree(pq4_db, tmp_path / "db")
    manifest = Manifest.load(db)
    recorded = manifest.database_index
    readers = {s: ShardReader(layout.shard_dir(db, s), manifest.row_layout()) for s in recorded["shards"]}
    try:
        projection = _projection(db)
        index = db_index._trained(readers, sum(r.rows for r in readers.values()), projection)
        for shard_id, reader in readers.items():
            vectors = reader.faiss_vectors(projection)
            if shard_id == recorded["shards"][-1]:
                vectors[[0, 1]] = vectors[[1, 0]]  # two rows' codes swapped
            index.add_with_ids(vectors, db_index.global_ids(shard_id, np.arange(reader.rows)))
    finally:
        for reader in readers.values():
            reader.close()
    path = db / layout.INDEX_DIR / recorded["file"]
    write_index(index, path)
    manifest.database_index = recorded | {"crc32c": db_index._file_crc32c(path)}
    manifest.save(db)
    result = cli_here("verify", db)
    assert result.returncode == 1 and "differ from its row" in result.stderr
    assert f"shard {recorded['shards'][-1]:05d}" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_index_lost_before_the_manifest_recorded_it_is_rebuilt_the_same(tmp_path, pq4_db):
    """A build killed after its shards sealed but before the manifest named the database index
    leaves the shards searchable by scanning their rows; running it again writes the same index."""
    import attribdb

    db = shutil.copytree(pq4_db, tmp_path / "db")
    manifest = Manifest.load(db)
    recorded = manifest.database_index
    manifest.database_index = None
    manifest.generations[0].state = "building"
    manifest.save(db)
    (db / layout.INDEX_DIR / recorded["file"]).rename(db / layout.INDEX_DIR / "leftover.faiss.tmp")
    with attribdb.open(db) as opened:  # meanwhile: every shard scanned
        indexes = opened.engine.store.indexes
        assert indexes.database is None and len(indexes.scanned) > 1
    corpus = Manifest.load(pq4_db).generations[0].corpus["path"]
    cli("build", db, "--corpus", corpus, "--quiet")
    assert Manifest.load(db).database_index == recorded and (db / layout.INDEX_DIR / recorded["file"]).is_file()


@pytest.mark.slow
def test_append_adds_its_shards_to_the_database_index_and_keeps_the_file_it_replaces(tmp_path, pq4_db):
    """The appended shards join the index, trained once; the file the manifest named before stays,
    so a reader that read the old manifest still opens it, and a reader whose file is already gone
    opens the database again from the new manifest instead of calling it damaged."""
    from attribdb.db_index import open_searchable
    from attribdb.faiss_index import read_index

    db = shutil.copytree(pq4_db, tmp_path / "db")
    before = Manifest.load(db)

    def codebook(recorded):
        from attribdb.native import faiss

        index = read_index(db / layout.INDEX_DIR / recorded["file"])
        return faiss.vector_to_array(db_index._scan(index).pq.centroids)

    trained = codebook(before.database_index)
    more = write_corpus(tmp_path / "more.jsonl", 300, seed=6, start=5000)
    cli_here("append", db, "--corpus", more, "--quiet", check=True)
    manifest = Manifest.load(db)
    after = manifest.database_index
    assert after["shards"] == manifest.shard_ids and np.array_equal(codebook(after), trained)
    assert after["trained_on"] == before.database_index["trained_on"]
    info = json.loads(cli_here("info", db, "--json", check=True).stdout)
    assert after["rows"] == info["sequences"] > before.database_index["rows"]
    assert "ok:" in cli_here("verify", db, check=True).stdout
    assert (db / layout.INDEX_DIR / before.database_index["file"]).is_file()
    for gone in (False, True):
        if gone:
            (db / layout.INDEX_DIR / before.database_index["file"]).unlink()
        readers, indexes = open_searchable(db, before, _projection(db))
        try:
            opened = set(readers) == set(manifest.shard_ids)
            assert indexes.recorded == (after if gone else before.database_index) and opened == gone
        finally:
            for reader in readers.values():
                reader.close()


def test_retired_index_files_are_deleted_after_the_grace_period(tmp_path):
    """Only files the manifest does not name, and retired for longer than the grace period."""
    from attribdb.manifest import Manifest as M

    folder = tmp_path / layout.INDEX_DIR
    folder.mkdir()
    names = ["rows-pq4-10-aaaaaaaa.faiss", "rows-pq4-20-bbbbbbbb.faiss", "rows-pq4-30-cccccccc.faiss", "x.tmp"]
    for name in names:
        (folder / name).write_bytes(b"x")
    old = time.time() - db_index.GRACE_SECONDS - 5
    for name in (names[0], names[2], names[3]):
        os.utime(folder / name, (old, old))
    manifest = M.__new__(M)
    manifest.database_index, manifest.checkpoints = {"file": names[2]}, []
    assert db_index.collect_retired(tmp_path, manifest) == [names[0], names[3]]
    assert sorted(p.name for p in folder.iterdir()) == [names[1], names[2]]


@pytest.mark.slow
def test_a_small_index_is_trained_again_once_the_database_outgrows_it(tmp_path, model_dir):
    """An index trained on a few hundred rows would serve a database of thousands with codes fitted
    to few; once the sample grows RETRAIN_GROWTH times, the next build or append trains it anew."""
    db = tmp_path / "db"
    cli_here("build", db, "--corpus", write_corpus(tmp_path / "a.jsonl", 40, seed=1), "--model", model_dir, "--quiet",
             *SETTINGS, "--index-kind", "pq4", check=True)
    first = Manifest.load(db).database_index
    cli_here("append", db, "--corpus", write_corpus(tmp_path / "b.jsonl", 400, seed=2, start=100), "--quiet",
             check=True)
    manifest = Manifest.load(db)
    second = manifest.database_index
    assert second["trained_on"] >= db_index.RETRAIN_GROWTH * first["trained_on"]
    assert second["shards"] == manifest.shard_ids and "ok:" in cli_here("verify", db, check=True).stdout
