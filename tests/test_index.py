"""The index build: resume after kill -9, torchrun, verify, append, malformed input, compression bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from attribdb import api, layout
from attribdb.compression import low_rank_scores
from attribdb.manifest import Manifest
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader

from conftest import write_corpus
from dbtools import (SMALL_SETTINGS, assert_same_database, assert_within_energy_bound, cli, committed_rows,
                     rewrite_manifest)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("big") / "corpus.jsonl", 260, seed=3)


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory, big_corpus, model_dir) -> Path:
    """An uninterrupted single-process build: what every other build must equal."""
    db = tmp_path_factory.mktemp("ref") / "db"
    cli("build", db, "--corpus", big_corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    return db


def test_build_verifies_and_counts_every_sequence(reference_db):
    out = cli("verify", reference_db)
    manifest = Manifest.load(reference_db)
    generation = manifest.generations[0]
    assert generation.state == "complete" and generation.shards == len(manifest.shard_ids) > 2
    assert f"ok: {generation.sequences} rows" in out.stdout
    info = json.loads(cli("info", reference_db, "--json").stdout)
    assert info["sequences"] == generation.sequences and info["documents"] == 260
    assert 0 < info["bytes_per_sequence"] < info["dense_float32_bytes_per_sequence"]
    assert all(0 < e <= 1 for e in info["energy_kept"].values())


def test_resume_after_kill_equals_uninterrupted_build(tmp_path, big_corpus, model_dir, reference_db):
    db = tmp_path / "db"
    args = [sys.executable, "-m", "attribdb", "build", str(db), "--corpus", str(big_corpus), "--model",
            str(model_dir), "--quiet", *SMALL_SETTINGS]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = layout.shard_dir(db, 2)  # kill in the middle of the third shard
    while committed_rows(target) < 16 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert Manifest.load(db).generations[0].state == "building"
    cli("build", db, "--corpus", big_corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    assert_same_database(db, reference_db)


def test_two_rank_torchrun_build_equals_single_process(tmp_path, big_corpus, model_dir, reference_db):
    db = tmp_path / "db"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "attribdb", "build", str(db), "--corpus", str(big_corpus), "--model", str(model_dir), "--quiet",
         *SMALL_SETTINGS],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_database(db, reference_db)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_a_flipped_byte_in_a_zarr_chunk(tmp_path, reference_db):
    db = _copy(reference_db, tmp_path / "db")
    chunk = next(p for p in sorted((layout.shard_dir(db, 1) / layout.GRADS_ZARR / layout.LOWRANK).rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = cli("verify", db, check=False)
    assert result.returncode == 1
    assert "shard 00001" in result.stderr and "lowrank" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_verify_catches_a_missing_lmdb_row(tmp_path, reference_db):
    db = _copy(reference_db, tmp_path / "db")
    env = lmdb.open(str(layout.shard_dir(db, 0) / layout.META_LMDB), max_dbs=4)
    with env.begin(write=True) as txn:
        assert txn.delete(layout.row_key(5), db=env.open_db(layout.ROWS_DB, txn=txn))
    env.close()
    result = cli("verify", db, check=False)
    assert result.returncode == 1 and "00000" in result.stderr and "row 5 has no metadata" in result.stderr


def test_append_adds_shards_and_refuses_another_model(tmp_path, corpus, model_dir, other_model_dir):
    db = tmp_path / "db"
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    before = Manifest.load(db)
    extra = write_corpus(tmp_path / "extra.jsonl", 20, seed=9, start=1000)
    refused = cli("append", db, "--corpus", extra, "--model", other_model_dir, "--quiet", check=False)
    assert refused.returncode == 1 and "differ from the model this database was built with" in refused.stderr
    assert Manifest.load(db).shard_ids == before.shard_ids, "a refused append must change nothing"
    cli("append", db, "--corpus", extra, "--quiet")
    after = Manifest.load(db)
    assert len(after.generations) == 2 and after.generations[1].first_shard == before.next_shard_id()
    for spelling in (extra, os.path.relpath(extra)):  # the same file by another path is the same corpus
        again = cli("append", db, "--corpus", spelling, "--quiet", check=False)
        assert again.returncode == 1 and "already in" in again.stderr
    rebuilt = cli("build", db, "--corpus", os.path.relpath(corpus), "--quiet")  # finished: nothing to do
    assert Manifest.load(db).generations == after.generations, rebuilt.stderr
    report = cli("verify", db).stdout
    assert f"{before.generations[0].sequences + after.generations[1].sequences} rows" in report


def test_a_database_from_before_normalized_indexes_keeps_raw_sketches(tmp_path, corpus, model_dir):
    """Its manifest has no normalized_index; its FAISS vectors are the raw sketches, and stay so."""
    db = tmp_path / "db"
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS,
        "--normalized-index", "false")
    rewrite_manifest(db, lambda manifest: manifest["settings"].pop("normalized_index"))
    assert Manifest.load(db).settings.normalized_index is False
    cli("append", db, "--corpus", write_corpus(tmp_path / "extra.jsonl", 20, seed=9, start=1000), "--quiet")
    refused = cli("build", db, "--corpus", corpus, "--quiet", "--normalized-index", "true", check=False)
    assert refused.returncode == 1 and "normalized-index" in refused.stderr
    cli("verify", db)
    with api.open(db) as database:
        for shard_id, reader in database.engine.shards.items():
            held = database.engine.indexes[shard_id].reconstruct_n(0, reader.rows)
            assert np.array_equal(held, reader.read(layout.SKETCH)), shard_id
        assert database.query("the cat", " sat").hits


def test_malformed_lines_are_counted_and_reported(tmp_path, model_dir):
    corpus = write_corpus(tmp_path / "bad.jsonl", 30, seed=4)
    with open(corpus, "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"id": "x", "body": "no text field"}) + "\n")
    failed = cli("build", tmp_path / "db1", "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS,
                 check=False)
    assert failed.returncode == 1 and "bad.jsonl:31" in failed.stderr and "Traceback" not in failed.stderr
    cli("build", tmp_path / "db2", "--corpus", corpus, "--model", model_dir, "--quiet", "--on-error", "skip",
        *SMALL_SETTINGS)
    generation = Manifest.load(tmp_path / "db2").generations[0]
    assert generation.malformed == 2 and generation.documents == 30
    info = json.loads(cli("info", tmp_path / "db2", "--json").stdout)
    assert info["generations"][0]["malformed"] == 2


def test_low_rank_factors_reproduce_scores_within_kept_energy(reference_db):
    runtime = Runtime.load(reference_db)
    reader = ShardReader(layout.shard_dir(reference_db, 0), runtime.row_layout)
    rows = np.arange(12)
    token_ids = [m["token_ids"] for m in reader.metadata(rows)]
    exact = runtime.encoder().preconditioned(token_ids)
    query = runtime.encoder().preconditioned([reader.metadata([20])[0]["token_ids"]])
    packed = torch.from_numpy(reader.read(layout.LOWRANK, rows))
    sigma = torch.from_numpy(reader.read(layout.SIGMA, rows))
    energy = reader.read(layout.ENERGY, rows)
    for j, m in enumerate(runtime.manifest.modules):
        u, v = runtime.row_layout.unpack(packed, m.name)
        approx = low_rank_scores(query[m.name], u, v, sigma[:, j])[0].double()
        true = torch.einsum("oi,noi->n", query[m.name][0], exact[m.name]).double()
        norms = query[m.name][0].norm().double() * exact[m.name].flatten(1).norm(dim=1).double()
        assert_within_energy_bound(approx, true, norms, torch.from_numpy(energy[:, j]).double(), m.name)
    reader.close()


@pytest.mark.parametrize("compressors", [["crc32c"], ["zstd", "crc32c"]])
def test_direct_row_reads_equal_zarr_reads(tmp_path, compressors):
    """The query path reads one-row chunks itself, bypassing zarr: it must decode exactly what
    zarr wrote, compressed or not, and reject a chunk whose checksum fails."""
    import zarr

    from attribdb.errors import StoreError
    from attribdb.shard import RowChunkFiles

    codecs = {"crc32c": zarr.codecs.Crc32cCodec(), "zstd": zarr.codecs.ZstdCodec(level=1)}
    data = np.random.default_rng(0).standard_normal((9, 40)).astype(np.float16)
    array = zarr.create_array(str(tmp_path / "a"), shape=data.shape, chunks=(1, 40), dtype="float16",
                              compressors=[codecs[c] for c in compressors], fill_value=0)
    array[:] = data
    files = RowChunkFiles.open(tmp_path / "a")
    rows = np.array([7, 0, 3, 3])
    assert files is not None and np.array_equal(files.read(rows), data[rows])
    chunk = tmp_path / "a" / "c" / "3" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum"):
        files.read(rows)
