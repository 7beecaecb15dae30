"""The rows a query reads: each shard's stored rows and records, and the indexes that find candidates among them.

Candidates come from the indexes (attribdb/db_index.py), by the inner products of
their sketches with the query's; their *stored-row scores* (the compressed
scores, per module) come from the rows themselves, read back from the row store.
"""

from __future__ import annotations

import numpy as np

from attribdb import layout
from attribdb.db_index import open_checkpoint, open_searchable
from attribdb.errors import QueryError
from attribdb.query.scored import ScoredRows
from attribdb.records import RowRecord
from attribdb.rows import QueryBlocks, module_scores
from attribdb.runtime import Runtime


class RowStore:
    """One checkpoint's rows (``runtime.checkpoint``; 0: the database's model) and the indexes over them."""

    def __init__(self, runtime: Runtime, shard_ids: list[int] | None = None, base: "RowStore | None" = None):
        """``shard_ids`` restricts the store to some shards (default: all); ``base``: the store of
        checkpoint 0, whose shards (and LMDB environments) another checkpoint's store reads through."""
        self.row_layout = runtime.row_layout
        self.modules = [m.name for m in runtime.manifest.modules]
        if base is None:
            self.shards, self.indexes = open_searchable(runtime.root, runtime.manifest, runtime.projection, shard_ids)
        else:
            self.shards = {s: reader.view(runtime.checkpoint, runtime.row_layout) for s, reader in base.shards.items()}
            self.indexes = open_checkpoint(runtime.root, runtime.manifest, self.shards, runtime.projection,
                                           runtime.checkpoint)

    @property
    def rows(self) -> int:
        return sum(reader.rows for reader in self.shards.values())

    def close(self) -> None:
        for reader in self.shards.values():
            reader.close()

    def search(self, sketches: np.ndarray, n: int, opponents: bool) -> list[list[tuple[int, int]]]:
        """Per query sketch, the (shard, row) of its best ``n`` rows by the indexes' inner product
        over every shard and, with ``opponents``, of its ``n`` most negative ones: both ends from
        one scan of each index."""
        count = len(sketches)
        both = np.concatenate([sketches, -sketches]) if opponents else sketches
        best = self.indexes.search(both, n)
        return [[(shard, row) for _, shard, row in best[i] + (best[count + i] if opponents else [])]
                for i in range(count)]

    def scores(self, query: QueryBlocks, pairs, query_self: float) -> ScoredRows:
        """Stored-row scores, per module, of the rows at (shard, row) ``pairs`` (each once, in
        (shard, row) order) for one query's side of the score, whose self-influence on the rows'
        subspaces is ``query_self``."""
        pairs = sorted(set(pairs))
        shards = np.array([p[0] for p in pairs], dtype=np.int64)
        rows = np.array([p[1] for p in pairs], dtype=np.int64)
        if not pairs:
            return ScoredRows(shards, rows, np.zeros(0), np.zeros((0, len(self.modules))), np.zeros(0), query_self)
        stored, self_m = [], []
        for reader, wanted in self._by_shard(shards, rows):
            stored.append(reader.read(layout.ROWS, wanted))
            self_m.append(reader.whole(layout.SELF_INFLUENCE)[wanted])
        self_m = np.concatenate(self_m)
        per_module = module_scores(self.row_layout, query, np.concatenate(stored))[0].double().cpu().numpy()
        return ScoredRows(shards, rows, per_module.sum(1), per_module, self_m.astype(np.float64), query_self)

    def _by_shard(self, shards: np.ndarray, rows: np.ndarray):
        """(reader, its rows) per shard; for shard-major sorted pairs, concatenating the
        per-shard results gives back the pairs' order."""
        for shard_id in np.unique(shards):
            yield self.shards[int(shard_id)], rows[shards == shard_id]

    def records(self, pairs) -> list[RowRecord]:
        """The LMDB records of the rows at (shard, row) ``pairs``, in their order (one read
        transaction per shard)."""
        pairs = [(int(shard), int(row)) for shard, row in pairs]
        rows_of: dict[int, list[int]] = {}
        for shard, row in pairs:
            rows_of.setdefault(shard, []).append(row)
        found = {(shard, row): record for shard, rows in rows_of.items()
                 for row, record in zip(rows, self.shards[shard].metadata(rows))}
        return [found[pair] for pair in pairs]

    def every_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards, rows, self-influence) of every stored row, shard by shard."""
        shards, rows, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        for shard_id, reader in self.shards.items():
            if reader.rows:
                values.append(reader.read(layout.SELF_INFLUENCE).astype(np.float64))
                rows.append(np.arange(reader.rows))
                shards.append(np.full(reader.rows, shard_id))
        return np.concatenate(shards), np.concatenate(rows), np.concatenate(values)

    def document_rows(self, doc_ids: list[str]) -> list[tuple[int, int]]:
        """(shard, row) of every row of the named documents, in the order named, through each
        shard's document index (one lookup per shard, no scan); an id no row belongs to is an
        error, not an empty answer (a typo would look like "no influence")."""
        if not doc_ids:
            raise QueryError("name at least one document id")
        pairs = []
        for doc_id in dict.fromkeys(doc_ids):
            found = [(shard_id, row) for shard_id, reader in sorted(self.shards.items())
                     for row in reader.document_rows(doc_id)]
            if not found:
                raise QueryError(f"unknown document id {doc_id!r}: no row of this database belongs to it")
            pairs += found
        return pairs
