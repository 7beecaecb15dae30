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
→ rows): one lookup per shard, no scan.  The rows go through the scoring
pipeline with every one recomputed, ordered by their rank instead of taking ends.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attribdb.query.clock import Clock
from attribdb.query.engine import QueryEngine
from attribdb.query.gradients import SolvedQueries
from attribdb.query.options import DEFAULT_CANDIDATES, Query, QueryOptions
from attribdb.query.pipeline import ScoringPipeline
from attribdb.query.results import QueryResult

SCAN_ROWS = 1024  # rows read at once when ranking: 1024 rows of 32 KiB, 32 MiB (64 MiB as float32)


def _compressed_keys(pipeline: ScoringPipeline, solved: list[SolvedQueries], rank_by: str) -> tuple[np.ndarray, dict]:
    """The compressed ranking key of every row, in (shard, row) order, and where each shard's
    rows start in it."""
    keys, offsets = [], {}
    for shard_id, reader in sorted(pipeline.store.shards.items()):
        offsets[shard_id] = sum(len(k) for k in keys)
        for start in range(0, reader.rows, SCAN_ROWS):
            rows = range(start, min(start + SCAN_ROWS, reader.rows))
            keys.append(pipeline.stored_scores(solved, 0, [(shard_id, row) for row in rows]).key(rank_by))
    return np.concatenate(keys) if keys else np.zeros(0), offsets


def index_ranks(engine: QueryEngine, query: Query, solved: list[SolvedQueries], pairs: list[tuple[int, int]],
                options: QueryOptions) -> list[int]:
    """The rank of each (shard, row) in the default index answer (at the checkpoints of
    ``options``) extended past its candidates (the module docstring says how)."""
    rank_by = options.rank_by
    [default] = engine.query([query], QueryOptions(k=DEFAULT_CANDIDATES, rank_by=rank_by,
                                                   checkpoints=options.checkpoints))
    answer = default.hits
    ranks = {(h.shard, h.row): h.rank for h in answer}
    if all(pair in ranks for pair in pairs):
        return [ranks[pair] for pair in pairs]
    keys, offsets = _compressed_keys(engine.pipeline_for(options.checkpoints), solved, rank_by)
    outside = np.ones(len(keys), dtype=bool)
    outside[[offsets[h.shard] + h.row for h in answer]] = False
    for shard_id, row in pairs:
        if (shard_id, row) not in ranks:
            at = offsets[shard_id] + row
            ahead = np.count_nonzero(outside & (keys > keys[at]))
            tied_before = np.count_nonzero(outside[:at] & (keys[:at] == keys[at]))
            ranks[(shard_id, row)] = len(answer) + 1 + int(ahead + tied_before)
    return [ranks[pair] for pair in pairs]


def score_documents(engine: QueryEngine, query: Query, doc_ids: list[str], options: QueryOptions) -> QueryResult:
    """A result in mode "score": one hit per row of the named documents, ordered by rank, each
    with its compressed and exact scores, per-token contributions, and as ``rank`` its place in
    the default index answer ranked by ``options.rank_by`` (extended past its candidates)."""
    clock = Clock()
    pipeline = engine.pipeline_for(options.checkpoints)
    pairs = engine.store.document_rows(doc_ids)
    every = dataclasses.replace(options, rescore=len(pairs), opponents=False)  # every named row recomputed
    solved, [scored] = pipeline.score([query], every, lambda solved: [pairs], clock)
    ranks = dict(zip(pairs, index_ranks(engine, query, solved, pairs, options)))
    order = sorted(range(len(scored.rows)), key=lambda i: ranks[(int(scored.shards[i]), int(scored.rows[i]))])
    hits = pipeline.hits(scored, np.array(order, dtype=np.int64))
    for hit in hits:
        hit.rank = ranks[(hit.shard, hit.row)]
    pipeline.contributions(hits, solved, 0)
    clock.lap("metadata")
    return QueryResult(query.prompt, query.completion, "score", hits, [], scored.reported_query_self, engine.rows,
                       clock.total(), rescored=len(hits))
