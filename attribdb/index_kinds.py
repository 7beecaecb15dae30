"""Index kinds, defined once: the names a database's ``index_kind`` setting takes.

``flat`` scans every shard's rows exactly, at every query; the database kind
adds one index of compact codes over every sealed shard's rows
(attribdb/db_index.py), and shards it does not cover yet are scanned.  ``auto``
scans while the database is small and brings in the database kind at scale.
No kind keeps a copy of the rows: they live once, in the row store.
"""

from __future__ import annotations

AUTO = "auto"
SHARD_KINDS = ("flat",)
DATABASE_KINDS = ("pq4",)  # the first is what "auto" brings in at scale
INDEX_KINDS = (AUTO,) + SHARD_KINDS + DATABASE_KINDS
