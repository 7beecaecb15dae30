"""Helpers for tests that build databases: run the CLI, compare two databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import zarr

from attribdb import layout
from attribdb.manifest import Manifest

SMALL_SETTINGS = ["--max-length", "16", "--shard-size", "32", "--commit-rows", "8", "--batch-size", "4",
                  "--fit-sample-size", "48", "--row-bytes", "4096"]


def cli(*args, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m attribdb ARGS` in a fresh process (single-threaded for reproducible floats)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env_extra or {})
    result = subprocess.run([sys.executable, "-m", "attribdb", *map(str, args)], capture_output=True, text=True,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"attribdb {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def cli_here(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`attribdb ARGS` in this process through click's runner: what the console script does, without
    the seconds of importing torch again.  For commands that cannot kill the process, and whose
    result does not depend on the thread count (`cli` runs single-threaded); a traceback (an
    exception the CLI did not turn into one line) is raised, failing the test with it."""
    from click.testing import CliRunner

    from attribdb.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        raise AssertionError(f"attribdb {' '.join(map(str, args))} failed:\n{result.stderr}")
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def lmdb_rows(shard: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(shard / layout.META_LMDB), readonly=True, max_dbs=4)
    try:
        with env.begin() as txn:
            out = {}
            for db_name in (layout.ROWS_DB, layout.DOCS_DB):
                db = env.open_db(db_name, txn=txn, create=False)
                out.update({db_name + b"/" + k: v for k, v in txn.cursor(db=db)})
            info = env.open_db(layout.INFO_DB, txn=txn, create=False)
            out[b"info/committed"] = txn.get(b"committed", db=info)
            out[b"info/sealed"] = txn.get(b"sealed", db=info)
        return out
    finally:
        env.close()


def committed_rows(shard: Path) -> int:
    if not (shard / layout.META_LMDB / "data.mdb").exists():
        return 0
    try:
        return int(lmdb_rows(shard)[b"info/committed"] or 0)
    except lmdb.Error:
        return 0


def assert_same_database(a: Path, b: Path) -> None:
    """Same shards, bit-identical arrays (read through zarr itself), row files, metadata, factors,
    text indexes and database index, at every checkpoint of a trajectory database."""
    manifest_a, manifest_b = Manifest.load(a), Manifest.load(b)
    assert manifest_a.shard_ids == manifest_b.shard_ids
    assert [g.sequences for g in manifest_a.generations] == [g.sequences for g in manifest_b.generations]
    assert all(g.state == "complete" for g in manifest_a.generations + manifest_b.generations)
    assert manifest_a.checkpoint_count == manifest_b.checkpoint_count
    checkpoints = range(manifest_a.checkpoint_count)
    for c in checkpoints:
        for path_a, path_b in zip(layout.factor_files(a, c), layout.factor_files(b, c)):
            assert path_a.read_bytes() == path_b.read_bytes()
    for shard_id in manifest_a.shard_ids:
        shard_a, shard_b = layout.shard_dir(a, shard_id), layout.shard_dir(b, shard_id)
        for grads in (layout.grads_zarr(c) for c in checkpoints):
            group_a = zarr.open_group(str(shard_a / grads), mode="r")
            group_b = zarr.open_group(str(shard_b / grads), mode="r")
            assert sorted(group_a.array_keys()) == sorted(group_b.array_keys())
            for name in group_a.array_keys():
                np.testing.assert_array_equal(group_a[name][:], group_b[name][:],
                                              err_msg=f"shard {shard_id} {grads} {name}")
            files_a, files_b = (sorted(p.relative_to(shard) for p in (shard / grads).rglob("*") if p.is_file())
                                for shard in (shard_a, shard_b))
            assert files_a == files_b
            for name in files_a:
                assert (shard_a / name).read_bytes() == (shard_b / name).read_bytes(), f"shard {shard_id} {name}"
        assert lmdb_rows(shard_a) == lmdb_rows(shard_b)
        text_a, text_b = (shard / layout.TEXT_FILE for shard in (shard_a, shard_b))
        assert text_a.read_bytes() == text_b.read_bytes(), f"shard {shard_id} {layout.TEXT_FILE}"
    for c in checkpoints:
        recorded = manifest_a.holder(c).database_index
        assert recorded == manifest_b.holder(c).database_index
        if recorded:
            name = recorded["file"]
            assert (a / layout.INDEX_DIR / name).read_bytes() == (b / layout.INDEX_DIR / name).read_bytes()


def journal(shard: Path) -> list[dict]:
    env = lmdb.open(str(shard / layout.META_LMDB), readonly=True, max_dbs=4)
    try:
        with env.begin() as txn:
            db = env.open_db(layout.JOURNAL_DB, txn=txn, create=False)
            return [json.loads(v) for _, v in txn.cursor(db=db)]
    finally:
        env.close()


def copy_db(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def copy_manifest(src: Path, dst: Path) -> Path:
    """A folder holding only ``src``'s manifest, for checks that read nothing else (a whole copy is
    thousands of files, a row per file, which cost more to delete than the check takes)."""
    import shutil

    dst.mkdir(parents=True)
    shutil.copy2(src / layout.MANIFEST, dst / layout.MANIFEST)
    return dst


def edit_lmdb(shard: Path, db_name: bytes, edit) -> None:
    """Call ``edit(txn, db)`` in a write transaction of one of a shard's named LMDB databases."""
    env = lmdb.open(str(shard / layout.META_LMDB), max_dbs=4)
    try:
        with env.begin(write=True) as txn:
            edit(txn, env.open_db(db_name, txn=txn))
    finally:
        env.close()


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The command failed with exit 1 and a single `Error: ...` line containing every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def rewrite_manifest(db: Path, edit) -> None:
    """Edit a manifest's JSON with ``edit(data)`` and store it with a valid checksum, as a program
    that means to change it would (a hand edit without resealing is refused by Manifest.load)."""
    from attribdb import manifest_schema

    data = json.loads((db / layout.MANIFEST).read_text())
    del data[manifest_schema.CHECKSUM_KEY]
    edit(data)
    data[manifest_schema.CHECKSUM_KEY] = manifest_schema.digest(data)
    (db / layout.MANIFEST).write_text(json.dumps(data, indent=2))
