"""The index build: resume after kill -9, torchrun, verify, append, malformed input, stored rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from attribdb import layout
from attribdb.manifest import Manifest
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader
from attribdb.tasks import collate_sequences

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, assert_same_database, cli, cli_here, committed_rows, copy_db


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("big") / "corpus.jsonl", 260, seed=3)


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory, big_corpus, model_dir) -> Path:
    """An uninterrupted single-process build: what every other build must equal."""
    db = tmp_path_factory.mktemp("ref") / "db"
    cli("build", db, "--corpus", big_corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    return db


@pytest.mark.slow
def test_build_verifies_and_counts_every_sequence(reference_db):
    out = cli("verify", reference_db)
    manifest = Manifest.load(reference_db)
    generation = manifest.generations[0]
    assert generation.state == "complete" and generation.shards == len(manifest.shard_ids) > 2
    assert f"ok: {generation.sequences} rows" in out.stdout
    info = json.loads(cli("info", reference_db, "--json").stdout)
    assert info["sequences"] == generation.sequences and info["documents"] == 260
    row = info["row"]
    assert row["bytes"] == row["payload_bytes"] + 4 < row["all_in"]["total"] <= 4096
    assert row["bytes"] < row["dense_float32_bytes"] and 0 < row["kept"] <= 1
    # the row store holds what the layout says a row is, plus chunk and checksum overhead
    assert row["bytes"] - 4 <= info["bytes_per_sequence"]["zarr"] < 1.1 * row["bytes"] + 64


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_verify_catches_a_flipped_byte_in_a_zarr_chunk(tmp_path, reference_db):
    db = _copy(reference_db, tmp_path / "db")
    chunk = next(p for p in sorted((layout.shard_dir(db, 1) / layout.GRADS_ZARR / layout.ROWS).rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = cli("verify", db, check=False)
    assert result.returncode == 1
    assert "shard 00001" in result.stderr and "'rows'" in result.stderr and "checksum" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_verify_catches_a_missing_lmdb_row(tmp_path, reference_db):
    db = _copy(reference_db, tmp_path / "db")
    env = lmdb.open(str(layout.shard_dir(db, 0) / layout.META_LMDB), max_dbs=4)
    with env.begin(write=True) as txn:
        assert txn.delete(layout.row_key(5), db=env.open_db(layout.ROWS_DB, txn=txn))
    env.close()
    result = cli("verify", db, check=False)
    assert result.returncode == 1 and "00000" in result.stderr and "row 5 has no metadata" in result.stderr


@pytest.mark.slow
def test_append_adds_shards_and_refuses_another_model(tmp_path, built_db, corpus, other_model_dir):
    db = copy_db(built_db, tmp_path / "db")
    before = Manifest.load(db)
    extra = write_corpus(tmp_path / "extra.jsonl", 20, seed=9, start=1000)
    refused = cli_here("append", db, "--corpus", extra, "--model", other_model_dir, "--quiet")
    assert refused.returncode == 1 and "differ from the model this database was built with" in refused.stderr
    assert Manifest.load(db).shard_ids == before.shard_ids, "a refused append must change nothing"
    cli_here("append", db, "--corpus", extra, "--quiet", check=True)
    after = Manifest.load(db)
    assert len(after.generations) == 2 and after.generations[1].first_shard == before.next_shard_id()
    for spelling in (extra, os.path.relpath(extra)):  # the same file by another path is the same corpus
        again = cli_here("append", db, "--corpus", spelling, "--quiet")
        assert again.returncode == 1 and "already in" in again.stderr
    rebuilt = cli_here("build", db, "--corpus", os.path.relpath(corpus), "--quiet", check=True)  # nothing to do
    assert Manifest.load(db).generations == after.generations, rebuilt.stderr
    report = cli_here("verify", db, check=True).stdout
    assert f"{before.generations[0].sequences + after.generations[1].sequences} rows" in report


@pytest.mark.slow
@pytest.mark.parametrize("version", [layout.FORMAT_VERSION - 1, 1])
def test_a_database_of_an_earlier_format_is_refused_in_one_line(tmp_path, reference_db, version):
    """Format 3 kept a file per row and float16 copies of the rows in FAISS: it is not read, and every
    command says so in one line naming its format, whatever else it would have read."""
    db = tmp_path / "old"
    (db / "shards").mkdir(parents=True)
    manifest = json.loads((reference_db / "manifest.json").read_text())
    (db / "manifest.json").write_text(json.dumps(manifest | {"format_version": version}))
    for command in (["info", db], ["query", db, "--prompt", "the cat", "--completion", " sat"], ["verify", db]):
        refused = cli_here(*command)
        assert refused.returncode == 1 and f"format version {version};" in refused.stderr, command
        assert f"reads version {layout.FORMAT_VERSION} only" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_malformed_lines_are_counted_and_reported(tmp_path, model_dir):
    corpus = write_corpus(tmp_path / "bad.jsonl", 30, seed=4)
    with open(corpus, "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"id": "x", "body": "no text field"}) + "\n")
    failed = cli_here("build", tmp_path / "db1", "--corpus", corpus, "--model", model_dir, "--quiet",
                      *SMALL_SETTINGS)
    assert failed.returncode == 1 and "bad.jsonl:31" in failed.stderr and "Traceback" not in failed.stderr
    cli_here("build", tmp_path / "db2", "--corpus", corpus, "--model", model_dir, "--quiet", "--on-error", "skip",
             *SMALL_SETTINGS, check=True)
    generation = Manifest.load(tmp_path / "db2").generations[0]
    assert generation.malformed == 2 and generation.documents == 30
    info = json.loads(cli_here("info", tmp_path / "db2", "--json", check=True).stdout)
    assert info["generations"][0]["malformed"] == 2


@pytest.mark.slow
def test_stored_rows_are_low_rank_approximations_of_the_dense_preconditioned_gradient(tmp_path, big_corpus,
                                                                                      model_dir):
    """What a build stored (through the row projection, never forming G) is, per module, close to
    Ĝ = (Q_Sᵀ G Q_A) ⊘ √(Λ + λ) computed densely from the full factors on the row's subspace, and its
    self-influence is ‖Ĝ‖² there exactly."""
    from attribdb.rows import unpack

    db = tmp_path / "db"
    cli("build", db, "--corpus", big_corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    runtime = Runtime.load(db)
    reader = ShardReader(layout.shard_dir(db, 1), runtime.row_layout)
    rows = np.arange(10)
    dense = runtime.computer.train_preconditioned(
        collate_sequences([m.token_ids for m in reader.metadata(rows)], runtime.tokenizer.pad_token_id))
    components = unpack(runtime.row_layout, reader.read(layout.ROWS, rows))
    errors, squared = [], np.zeros(len(rows))
    for module, stored in zip(runtime.manifest.modules, components):
        factors, subspace = runtime.computer.factors[module.name], runtime.projection.maps[module.name]
        kept_out = (factors.eigvecs_out.T @ subspace.out.to(factors.eigvecs_out.dtype)).abs().argmax(0)
        kept_in = (factors.eigvecs_in.T @ subspace.inp.to(factors.eigvecs_in.dtype)).abs().argmax(0)
        expected = dense[module.name][:, kept_out][:, :, kept_in].double().numpy()
        got = np.zeros_like(expected)
        np.add.at(got, stored.rows, np.einsum("no,ni->noi", stored.left, stored.right))
        errors.append(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        squared += (expected ** 2).sum(axis=(1, 2))
    assert max(errors) < 0.5 and np.mean(errors) < 0.3, errors
    np.testing.assert_allclose(reader.read(layout.SELF_INFLUENCE, rows), squared, rtol=1e-3)
    reader.close()


def test_packed_rows_are_zarr_shards_one_file_per_commit_unit(tmp_path):
    """Rows written one commit unit per file read back the same through zarr (the files are Zarr v3
    shards), rows zarr writes read back the same here, and a flipped byte in a row or in a file's
    row index is a checksum error, never a wrong row."""
    import zarr

    from attribdb import packed_rows
    from attribdb.errors import StoreError

    data = np.random.default_rng(0).standard_normal((11, 40)).astype(np.float16)  # 3 units of 4, the last short
    ours = packed_rows.create(zarr.open_group(str(tmp_path / "ours"), mode="w"), "rows", 11, (40,), 4, "float16")
    for start in range(0, 11, 4):
        ours.write(start, data[start:start + 4])
    assert sorted(str(p.relative_to(tmp_path / "ours" / "rows")) for p in (tmp_path / "ours" / "rows").rglob("*")
                  if p.is_file()) == ["c/0/0", "c/1/0", "c/2/0", "zarr.json"]
    assert np.array_equal(zarr.open_array(str(tmp_path / "ours" / "rows"), mode="r")[:], data)
    theirs_group = zarr.open_group(str(tmp_path / "theirs"), mode="w")
    packed_rows.create(theirs_group, "rows", 11, (40,), 4, "float16")
    theirs_group["rows"][:] = data
    rows = np.array([10, 0, 7, 3, 3, 8])
    for folder in ("ours", "theirs"):
        assert np.array_equal(packed_rows.PackedRows.open(tmp_path / folder / "rows").read(rows), data[rows])
    unit = tmp_path / "ours" / "rows" / "c" / "1" / "0"
    for at, problem in ((3 * 84 + 5, "checksum mismatch in row 7"), (-10, "row index fails its checksum")):
        raw = bytearray(unit.read_bytes())
        raw[at] ^= 0xFF
        unit.write_bytes(bytes(raw))
        with pytest.raises(StoreError, match=problem):
            ours.read(rows)
        raw[at] ^= 0xFF
        unit.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="not one commit unit"):
        ours.write(2, data[2:6])


@pytest.mark.slow
def test_deep_verify_recomputes_rows_and_catches_a_shard_from_another_model(tmp_path, corpus, model_dir,
                                                                            other_model_dir):
    """A shard whose every checksum holds but whose rows another model wrote passes plain verify;
    recomputing rows from their tokens tells.  (The identity strategy gives both databases the
    same row layout, whatever their models, so the foreign shard fits every shape check.)"""
    dbs = {}
    for name, model in (("db", model_dir), ("other", other_model_dir)):
        dbs[name] = tmp_path / name
        cli_here("build", dbs[name], "--corpus", corpus, "--model", model, "--quiet", *SMALL_SETTINGS,
                 "--strategy", "identity", check=True)
    deep = cli_here("verify", dbs["db"], "--deep", "12", check=True)
    assert "12 recomputed from their tokens and equal" in deep.stdout
    shutil.rmtree(layout.shard_dir(dbs["db"], 1))
    shutil.copytree(layout.shard_dir(dbs["other"], 1), layout.shard_dir(dbs["db"], 1))
    assert cli_here("verify", dbs["db"]).returncode == 0  # every byte is as it was written
    caught = cli_here("verify", dbs["db"], "--deep", "40")
    assert caught.returncode == 1 and "shard 00001" in caught.stderr and "recomputation" in caught.stderr
