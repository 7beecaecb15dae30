"""Named documents: where does a document the user expected rank for a query, and why?

A user who believes a document should be influential names it by its id.  Each
of its rows (a long document is several) gets the exact EK-FAC score with its
per-token contributions (the exact mode's recomputation) and the rank it has
in the default index answer, extended past its candidates:

- a row the default answer returns (``k`` up to its 128 candidates) has the
  rank the answer gives it, rescoring included;
- any other row comes after those, in the order of the compressed key the
  index ranks by (the stored rows' cosine, or their score with
  ``rank_by="score"``), ties broken by (shard, row) as the index breaks them.

The ranks of all rows are thus a permutation, and a row with rank r is what a
query for k >= r returns at place r whenever r is within the candidates.
Ranking rows outside the answer takes one pass over the stored rows,
``SCAN_ROWS`` at a time, keeping only their keys (9 bytes a row), so memory
stays bounded whatever the database size.

Documents are found through each shard's document index in LMDB (document id
→ rows): one lookup per shard, no scan.
"""

from __future__ import annotations

import time

import numpy as np

from attribdb.errors import QueryError
from attribdb.query.engine import DEFAULT_CANDIDATES, Query, QueryEngine, _check_rank_by
from attribdb.query.results import QueryResult

SCAN_ROWS = 1024  # rows read at once when ranking: 1024 rows of 32 KiB, 32 MiB (64 MiB as float32)


def document_rows(engine: QueryEngine, doc_ids: list[str]) -> list[tuple[int, int]]:
    """(shard, row) of every row of the named documents, in the order named; an id no row
    belongs to is an error, not an empty answer (a typo would look like "no influence")."""
    if not doc_ids:
        raise QueryError("name at least one document id")
    pairs = []
    for doc_id in dict.fromkeys(doc_ids):
        found = [(shard_id, row) for shard_id, reader in sorted(engine.shards.items())
                 for row in reader.document_rows(doc_id)]
        if not found:
            raise QueryError(f"unknown document id {doc_id!r}: no row of this database belongs to it")
        pairs += found
    return pairs


def _compressed_keys(engine: QueryEngine, query_row, self_q: float, rank_by: str) -> tuple[np.ndarray, dict]:
    """The compressed ranking key of every row, in (shard, row) order, and where each shard's
    rows start in it."""
    keys, offsets = [], {}
    for shard_id, reader in sorted(engine.shards.items()):
        offsets[shard_id] = sum(len(k) for k in keys)
        for start in range(0, reader.rows, SCAN_ROWS):
            rows = range(start, min(start + SCAN_ROWS, reader.rows))
            keys.append(engine._rescore(query_row, [(0.0, shard_id, row) for row in rows], self_q).key(rank_by))
    return np.concatenate(keys) if keys else np.zeros(0), offsets


def index_ranks(engine: QueryEngine, query: Query, query_row, self_q: float, pairs: list[tuple[int, int]],
                rank_by: str) -> list[int]:
    """The rank of each (shard, row) in the default index answer extended past its candidates
    (the module docstring says how)."""
    answer = engine.query([query], k=DEFAULT_CANDIDATES, rank_by=rank_by)[0].hits
    ranks = {(h.shard, h.row): h.rank for h in answer}
    if all(pair in ranks for pair in pairs):
        return [ranks[pair] for pair in pairs]
    keys, offsets = _compressed_keys(engine, query_row, self_q, rank_by)
    outside = np.ones(len(keys), dtype=bool)
    outside[[offsets[h.shard] + h.row for h in answer]] = False
    for shard_id, row in pairs:
        if (shard_id, row) not in ranks:
            at = offsets[shard_id] + row
            ahead = np.count_nonzero(outside & (keys > keys[at]))
            tied_before = np.count_nonzero(outside[:at] & (keys[:at] == keys[at]))
            before = ahead + tied_before
            ranks[(shard_id, row)] = len(answer) + 1 + int(before)
    return [ranks[pair] for pair in pairs]


def score_documents(engine: QueryEngine, query: Query, doc_ids: list[str],
                    rank_by: str | None = None) -> QueryResult:
    """A result in mode "score": one hit per row of the named documents, ordered by rank, each
    with its compressed and exact scores, per-token contributions, and as ``rank`` its place in
    the default index answer ranked by ``rank_by`` (extended past its candidates)."""
    rank_by = _check_rank_by(rank_by)
    started = time.perf_counter()
    pairs = document_rows(engine, doc_ids)
    solved = engine._solve([query])
    query_row = engine.runtime.projection.encode_query(solved.captures).float()
    self_q = float(query_row.double().pow(2).sum())
    ranks = dict(zip(pairs, index_ranks(engine, query, query_row, self_q, pairs, rank_by)))
    scored = engine._rescore(query_row, [(0.0, shard_id, row) for shard_id, row in pairs], self_q)
    scored.first = {"top": np.ones(len(scored.rows), dtype=bool)}  # every named row recomputed in full
    engine._recompute_scores([scored], solved)
    scored.exact_query_self = float(solved.self_influence()[0])
    order = sorted(range(len(scored.rows)), key=lambda i: ranks[(int(scored.shards[i]), int(scored.rows[i]))])
    hits = engine._hits(scored, np.array(order, dtype=np.int64))
    for hit in hits:
        hit.rank = ranks[(hit.shard, hit.row)]
    batch_size = engine.runtime.manifest.settings.batch_size  # a long document is many rows
    for start in range(0, len(hits), batch_size):
        engine._contribute(hits[start:start + batch_size], solved.one(0))
    return QueryResult(query.prompt, query.completion, "score", hits, [], scored.exact_query_self, engine.rows,
                       {"total": 1000 * (time.perf_counter() - started)}, rescored=len(hits))
