"""Shard metadata environments: small maps that grow, so thousands of shards open in one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attribdb import metadb

ROW = b"x" * 3000


def _write_rows(env, first: int, count: int) -> None:
    def body(txn):
        for row in range(first, first + count):
            txn.put(row.to_bytes(8, "big"), ROW)
    metadb.write(env, body)


@pytest.mark.slow
def test_two_thousand_shard_environments_open_at_once(tmp_path):
    paths = [tmp_path / f"{i:05d}" for i in range(2000)]
    for path in paths:
        env = metadb.open_env(path, readonly=False, capacity_rows=1)
        _write_rows(env, 0, 1)
        metadb.close_env(env)
    readers = [metadb.open_env(path, readonly=True) for path in paths]
    try:
        for env in readers:
            with metadb.read(env) as txn:
                assert txn.get((0).to_bytes(8, "big")) == ROW
            file_size = os.path.getsize(os.path.join(env.path(), "data.mdb"))
            assert env.info()["map_size"] < file_size + metadb.GRANULE
    finally:
        for env in readers:
            metadb.close_env(env)


def test_a_full_map_grows_and_the_whole_transaction_is_retried(tmp_path):
    env = metadb.open_env(tmp_path / "shard", readonly=False, capacity_rows=1)
    try:
        start = env.info()["map_size"]
        assert start == metadb.MIN_MAP_SIZE
        _write_rows(env, 0, 100)  # fits
        _write_rows(env, 100, 2000)  # ~6 MiB in one transaction: several doublings
        assert env.info()["map_size"] >= 8 * start
        with metadb.read(env) as txn:
            assert txn.stat()["entries"] == 2100
            assert all(txn.get(row.to_bytes(8, "big")) == ROW for row in range(2100))
    finally:
        metadb.close_env(env)


def test_a_reader_follows_a_map_another_process_grew(tmp_path):
    path = tmp_path / "shard"
    env = metadb.open_env(path, readonly=False, capacity_rows=1)
    _write_rows(env, 0, 1)
    metadb.close_env(env)
    reader = metadb.open_env(path, readonly=True)
    try:
        grow = ("import sys; from attribdb import metadb\n"
                "env = metadb.open_env(sys.argv[1], readonly=False, capacity_rows=1)\n"
                "metadb.write(env, lambda txn: [txn.put(i.to_bytes(8, 'big'), b'x' * 3000) for i in range(1, 3000)])\n")
        subprocess.run([sys.executable, "-c", grow, str(path)], check=True)
        with metadb.read(reader) as txn:
            assert txn.stat()["entries"] == 3000
    finally:
        metadb.close_env(reader)
