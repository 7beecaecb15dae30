"""Checksummed LMDB values: a flipped byte in a record is an error, never a wrong answer.

LMDB checks its B-tree structure but not the bytes of a value, so an edited
letter in a row's text or a changed token id used to be shown and rescored as
if it were true.  Every JSON value attribdb puts in LMDB is stored as

    8 hex digits of CRC32C(key + body) | one space | body (canonical JSON)

The key is part of the checksum, so a record copied under another row's key
fails as surely as a corrupted one; reading turns any failure (checksum,
UTF-8, JSON) into a :class:`StoreError` naming where the record lives.

A row's record has a type, :class:`RowRecord`, read and written here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

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


@dataclass(frozen=True)
class RowRecord:
    """What LMDB keeps per row: enough to show its text and to recompute its gradient, and the
    sequence's number in its corpus stream, which binds the row to its place (verify checks it)."""

    doc_id: str
    source: str
    token_span: tuple[int, int]  # [start, end) in the document's tokens
    char_span: tuple[int, int]  # [start, end) in the document's text
    text: str  # the document's text[char_span[0]:char_span[1]]
    token_ids: tuple[int, ...]
    sequence: int  # its number in the corpus stream

    def to_dict(self) -> dict:
        return {"doc_id": self.doc_id, "source": self.source, "token_span": list(self.token_span),
                "char_span": list(self.char_span), "text": self.text, "token_ids": list(self.token_ids),
                "sequence": self.sequence}

    def to_bytes(self, key: bytes) -> bytes:
        """The stored bytes of this record under ``key`` (its row's key)."""
        return pack(key, self.to_dict())

    @classmethod
    def from_bytes(cls, key: bytes, raw: bytes, where: str) -> "RowRecord":
        """The record stored under ``key``; a record without a field is damaged (records written before
        character spans were kept have none: their text is the whole span)."""
        value = unpack(key, raw, where)
        if not isinstance(value, dict):
            raise StoreError(f"{where}: the record is not a row's record")
        value.setdefault("char_span", [0, len(value.get("text", ""))])
        missing = [f.name for f in fields(cls) if f.name not in value]
        if missing:
            raise StoreError(f"{where}: the record has no {missing[0]}")
        try:
            return cls(doc_id=str(value["doc_id"]), source=str(value["source"]),
                       token_span=_pair(value["token_span"]), char_span=_pair(value["char_span"]),
                       text=str(value["text"]), token_ids=tuple(int(t) for t in value["token_ids"]),
                       sequence=int(value["sequence"]))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{where}: the record holds a field of the wrong type ({exc})") from None


def _pair(value) -> tuple[int, int]:
    start, end = value
    return int(start), int(end)
