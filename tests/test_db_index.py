"""The database-wide FAISS index: the auto rule, recall against brute force, verify, append, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from attribdb import db_index, layout
from attribdb.manifest import Manifest
from attribdb.shard import ShardReader

from conftest import write_corpus
from dbtools import cli

SETTINGS = ["--max-length", "16", "--shard-size", "512", "--commit-rows", "64", "--batch-size", "64",
            "--fit-sample-size", "48", "--row-bytes", "512", "--index-kind", "ivf-sq8"]


def test_the_auto_rule_picks_the_kinds_as_documented():
    assert not db_index.wanted("auto", db_index.AUTO_MIN_ROWS - 1)
    assert db_index.wanted("auto", db_index.AUTO_MIN_ROWS)
    assert db_index.wanted("ivf-sq8", 1) and db_index.wanted("ivf-sq8", 10 ** 7)
    for kind in ("flat", "hnsw", "ivf"):
        assert not db_index.wanted(kind, 10 ** 7)
    assert db_index.list_count(10 ** 6) == 1000 and db_index.list_count(1000) == 1000 // db_index.TRAIN_POINTS_PER_LIST
    assert db_index.nprobe_for(1000) >= db_index.MIN_NPROBE and db_index.nprobe_for(10) == 10


@pytest.fixture(scope="module")
def ivf_db(tmp_path_factory, model_dir) -> Path:
    corpus = write_corpus(tmp_path_factory.mktemp("ivf") / "corpus.jsonl", 2400, seed=5)
    db = tmp_path_factory.mktemp("ivf") / "db"
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SETTINGS)
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


def test_an_ivf_sq8_database_answers_like_brute_force_over_its_rows(ivf_db):
    import attribdb

    recorded = Manifest.load(ivf_db).database_index
    assert recorded["rows"] > 3000 and recorded["nprobe"] < recorded["nlist"]  # not a scan of every list
    with attribdb.open(ivf_db) as db:
        engine = db.engine
        assert engine.indexes.database is not None and not engine.indexes.shard_indexes
        rng = np.random.default_rng(0)
        words = "the cat dog bird sat ran flew over under near house tree river stone".split()
        queries = [(" ".join(rng.choice(words, 4)), " " + " ".join(rng.choice(words, 2))) for _ in range(40)]
        results = db.query_batch(queries, k=10, rescore=0)  # the index answer, not its exact rescoring
        from query.engine import Query
        query_rows = engine.query_rows([Query(*q) for q in queries]).float().numpy()
    assert recall_at(results, _brute_force_scores(ivf_db, query_rows), 10) >= 0.95


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
        assert opened.engine.indexes.database is None and len(opened.engine.indexes.shard_indexes) > 1
    corpus = Manifest.load(ivf_db).generations[0].corpus["path"]
    cli("build", db, "--corpus", corpus, "--quiet")
    rebuilt = Manifest.load(db).database_index
    assert rebuilt == recorded and sorted(p.name for p in (db / layout.INDEX_DIR).iterdir()) == [recorded["file"]]


def test_append_adds_its_shards_to_the_database_index(tmp_path, ivf_db):
    db = shutil.copytree(ivf_db, tmp_path / "db")
    before = Manifest.load(db).database_index
    more = write_corpus(tmp_path / "more.jsonl", 300, seed=6, start=5000)
    cli("append", db, "--corpus", more, "--quiet")
    manifest = Manifest.load(db)
    after = manifest.database_index
    assert after["shards"] == manifest.shard_ids and after["nlist"] == before["nlist"]  # trained once
    info = json.loads(cli("info", db, "--json").stdout)
    assert after["rows"] == info["sequences"] > before["rows"]
    assert "ok:" in cli("verify", db).stdout
