"""LMDB record integrity: checksums, rows bound to their sequence, damaged files as one line."""

from __future__ import annotations

import json

import pytest

from attribdb import layout, records
from attribdb.errors import StoreError
from attribdb.manifest import Manifest
from attribdb.shard import ShardReader

from dbtools import cli_here, copy_db, edit_lmdb, one_line_error

QUERY = ["--prompt", "the cat", "--completion", " sat over the house"]


def test_pack_round_trips_and_binds_the_key():
    value = {"text": "héllo", "token_ids": [1, 2, 3], "sequence": 7}
    raw = records.pack(b"k1", value)
    assert records.unpack(b"k1", raw, "here") == value
    with pytest.raises(StoreError, match="here: the record fails its checksum"):
        records.unpack(b"k2", raw, "here")  # the same bytes under another key
    for position in range(len(raw)):  # every single-byte flip is caught, never a decode error
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        with pytest.raises(StoreError):
            records.unpack(b"k1", bytes(damaged), "here")


def _rewrite_row(shard, row: int, change) -> None:
    """Replace the stored bytes of a row's record by ``change(raw)``."""
    def edit(txn, db):
        key = layout.row_key(row)
        txn.put(key, change(bytes(txn.get(key, db=db))), db=db)
    edit_lmdb(shard, layout.ROWS_DB, edit)


def test_an_edited_record_fails_verify_and_reads_naming_shard_and_row(tmp_path, built_db):
    db = copy_db(built_db, tmp_path / "db")
    shard = layout.shard_dir(db, 1)
    _rewrite_row(shard, 3, lambda raw: raw.replace(b'"text":"', b'"text":"X', 1))
    one_line_error(cli_here("verify", db), "00001", "row 3", "checksum")
    reader = ShardReader(shard, Manifest.load(db).row_layout())
    try:
        with pytest.raises(StoreError, match="00001 row 3: the record fails its checksum"):
            reader.metadata([3])
        assert reader.metadata([2])[0].sequence == 32 + 2  # its neighbours still read
    finally:
        reader.close()


def test_a_row_holding_another_sequence_fails_verify(tmp_path, built_db):
    """A record with a valid checksum in the wrong place (what interleaved writers produced)."""
    db = copy_db(built_db, tmp_path / "db")
    shard = layout.shard_dir(db, 2)
    other = ShardReader(layout.shard_dir(db, 0), Manifest.load(db).row_layout())
    record = other.metadata([5])[0]
    other.close()
    _rewrite_row(shard, 5, lambda raw: record.to_bytes(layout.row_key(5)))
    one_line_error(cli_here("verify", db), "shard 00002", "row 5 holds sequence 5", "not 69")


def test_non_utf8_bytes_in_a_record_are_one_line(tmp_path, built_db):
    db = copy_db(built_db, tmp_path / "db")
    _rewrite_row(layout.shard_dir(db, 0), 0, lambda raw: raw[:20] + b"\xff\xfe" + raw[22:])
    result = cli_here("verify", db)
    one_line_error(result, "00000 row 0")
    assert "UnicodeDecodeError" not in result.stderr


@pytest.mark.parametrize("keep", [100, 4096 + 100, -4096])
def test_a_truncated_data_file_is_one_line_not_a_bus_error(tmp_path, built_db, keep):
    db = copy_db(built_db, tmp_path / "db")
    data = layout.shard_dir(db, 1) / layout.META_LMDB / "data.mdb"
    content = data.read_bytes()
    data.write_bytes(content[:keep] if keep >= 0 else content[:len(content) + keep])
    one_line_error(cli_here("verify", db), "data.mdb")
    if keep == -4096:
        one_line_error(cli_here("query", db, *QUERY), "data.mdb", "truncated")


def test_a_healthy_database_stores_checksummed_sequence_numbers(built_db):
    manifest = Manifest.load(built_db)
    shard_size = manifest.settings.shard_size
    for shard_id in manifest.shard_ids[:3]:
        reader = ShardReader(layout.shard_dir(built_db, shard_id), manifest.row_layout())
        try:
            assert [m.sequence for m in reader.metadata(range(reader.rows))] == \
                   list(range(shard_id * shard_size, shard_id * shard_size + reader.rows))
            assert [(e["rows_start"], e["rows_end"]) for e in reader.journal()] == \
                   [(s, s + 8) for s in range(0, reader.rows, 8)]
        finally:
            reader.close()
    assert json.loads(cli_here("info", built_db, "--json").stdout)["sequences"] == manifest.generations[0].sequences


def test_a_committed_count_that_disagrees_with_the_sealed_one_is_one_line(tmp_path, built_db):
    db = copy_db(built_db, tmp_path / "db")
    edit_lmdb(layout.shard_dir(db, 1), layout.INFO_DB, lambda txn, info: txn.put(b"committed", b"16", db=info))
    one_line_error(cli_here("query", db, *QUERY), "00001", "16 rows committed but 32 sealed")
