"""Index kinds, defined once: the names a database's ``index_kind`` setting takes.

Per-shard kinds index each sealed shard on its own (attribdb/faiss_index.py);
database kinds add one index over every shard's rows (attribdb/db_index.py),
while each shard keeps a flat index of its own, searchable from its seal until
the database index covers it.  ``auto`` starts per shard and brings in the
default database kind at scale.
"""

from __future__ import annotations

AUTO = "auto"
SHARD_KINDS = ("flat", "hnsw", "ivf")
DATABASE_KINDS = ("pq4", "ivf-sq8")  # the first is what "auto" brings in at scale
INDEX_KINDS = (AUTO,) + SHARD_KINDS + DATABASE_KINDS


def shard_index_kind(index_kind: str) -> str:
    """The kind of a shard's own index: flat where a database index takes over (``auto`` and the
    database kinds), so a shard is searchable exactly from its seal until that index covers it."""
    return index_kind if index_kind in SHARD_KINDS else "flat"
