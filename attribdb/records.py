"""Checksummed LMDB values: a flipped byte in a record is an error, never a wrong answer.

LMDB checks its B-tree structure but not the bytes of a value, so an edited
letter in a row's text or a changed token id used to be shown and rescored as
if it were true.  Every JSON value attribdb puts in LMDB is stored as

    8 hex digits of CRC32C(key + body) | one space | body (canonical JSON)

The key is part of the checksum, so a record copied under another row's key
fails as surely as a corrupted one; reading turns any failure (checksum,
UTF-8, JSON) into a :class:`StoreError` naming where the record lives.
"""

from __future__ import annotations

import json

import google_crc32c

from attribdb.errors import StoreError


def _crc(key: bytes, body: bytes) -> bytes:
    return f"{google_crc32c.value(key + body):08x}".encode()


def pack(key: bytes, value) -> bytes:
    """The stored bytes of ``value`` under ``key``."""
    body = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return _crc(key, body) + b" " + body


def unpack(key: bytes, raw: bytes, where: str):
    """The value stored by :func:`pack`; ``where`` names the record in the error (shard and row)."""
    raw = bytes(raw)
    if len(raw) < 9 or raw[8:9] != b" " or raw[:8] != _crc(key, raw[9:]):
        raise StoreError(f"{where}: the record fails its checksum (corrupted metadata; run attribdb verify)")
    try:
        return json.loads(raw[9:].decode())
    except (UnicodeDecodeError, ValueError) as exc:  # a checksum collision, or a bug that wrote bad JSON
        raise StoreError(f"{where}: the record is not valid JSON ({exc})") from None
