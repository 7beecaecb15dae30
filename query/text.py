"""Full-text query modes: BM25 alone, and BM25 as the prefilter of exact influence.

- *text* (``--mode text``): the rows that best match the query's words by
  BM25 over every shard's full-text index (attribdb/text_index.py).  It needs
  no model, so users can set text retrieval against influence in one tool.
- *prefilter* (``--prefilter bm25:N``): what Grosse et al. (2023) did to make
  influence practical on a large corpus: influence computed only on the top
  TF-IDF matches of each query.  Here the BM25 top N rows are recomputed in
  full from their stored tokens (the uncompressed EK-FAC score, as exact mode
  recomputes the index's candidates) and ranked by their exact score; FAISS
  is not searched.
- *hybrid* (``--prefilter bm25:N --rank-by hybrid``): the same BM25 top N,
  ranked by the reciprocal-rank fusion (Cormack et al., 2009) of their BM25
  order and their exact influence order (the normalized, cosine key): a row
  scores ``1 / (RRF_C + its BM25 rank) + 1 / (RRF_C + its influence rank)``,
  ties going to the better BM25 rank.  On both evaluation worlds of
  docs/evidence.md it traced facts better than BM25 top N + influence.  Its
  hits carry the fused score in ``fused`` and no per-token contributions.

The BM25 query is the prompt and the completion by default: the completion
holds the words the documents behind it state (on the two evaluation worlds of
docs/evidence.md, BM25's MRR of the stating documents was 0.89 and 0.82 with both,
0.49 and 0.53 with the prompt alone); ``bm25_query="prompt"`` searches with the prompt only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from attribdb import layout
from attribdb.errors import QueryError
from attribdb.inspection import existing_shards
from attribdb.manifest import Manifest
from attribdb.progress import say
from attribdb.query.clock import Clock
from attribdb.query.engine import QueryEngine
from attribdb.query.options import HYBRID, RANK_BY, Query, QueryOptions
from attribdb.query.results import Hit, QueryResult
from attribdb.shard import ShardReader
from attribdb.text_index import QueryTerms, bm25_top

BM25_QUERIES = ("prompt+completion", "prompt")  # the first is the default
RRF_C = 60  # reciprocal-rank fusion's constant, as Cormack, Clarke and Buettcher (2009) set it; not tuned here


def reciprocal_rank_fusion(rankings: list[list], c: int = RRF_C) -> list[tuple[object, float]]:
    """Items of ``rankings`` (each best first) by the sum over rankings of 1 / (c + their rank
    there), rank 1 the best and nothing from a ranking that lacks the item; ties keep the order in
    which the items first appear, the first ranking before the second.  Returns (item, fused score)."""
    fused: dict = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (c + rank)
    first = {item: i for i, item in enumerate(dict.fromkeys(item for ranking in rankings for item in ranking))}
    return sorted(fused.items(), key=lambda pair: (-pair[1], first[pair[0]]))


def bm25_text(query: Query, bm25_query: str | None) -> str:
    """The text BM25 searches with for ``query``."""
    if bm25_query in (None, BM25_QUERIES[0]):
        return f"{query.prompt} {query.completion}"
    if bm25_query == BM25_QUERIES[1]:
        return query.prompt
    raise QueryError(f"bm25-query must be one of {', '.join(BM25_QUERIES)}, not {bm25_query!r}")


class TextSearch:
    """Every shard's full-text index, open for query after query (no model needed)."""

    def __init__(self, root: str | Path, quiet: bool = False):
        manifest = Manifest.load(Path(root))
        self.readers = {shard_id: ShardReader(path, manifest.row_layout())
                        for shard_id, path in existing_shards(Path(root), manifest)}
        unindexed = [reader for reader in self.readers.values() if reader.sealed and not reader.has_text_index]
        if unindexed:
            say(f"{len(unindexed)} of {len(self.readers)} shards of {root} were built before attribdb indexed text: "
                f"indexing their {sum(r.rows for r in unindexed)} rows' text in memory for this session", quiet)
        self.indexes = {shard_id: reader.text_index() for shard_id, reader in self.readers.items() if reader.rows}
        self.terms = QueryTerms()

    def top(self, query: Query, n: int, bm25_query: str | None = None) -> tuple[list[Hit], int]:
        """The ``n`` best rows by BM25 as hits (score = BM25), and how many rows hold a query term."""
        found, matched = bm25_top(self.indexes, self.terms(bm25_text(query, bm25_query)), n)
        hits = []
        for rank, (score, shard_id, row) in enumerate(found, start=1):
            reader = self.readers[shard_id]
            hits.append(Hit.from_record(reader.metadata([row])[0], shard_id, row, rank=rank, score=score,
                                        normalized_score=None, bm25=score, module_scores={},
                                        self_influence=float(reader.whole(layout.SELF_INFLUENCE)[row])))
        return hits, matched

    def search(self, queries: list[Query], k: int = 10, bm25_query: str | None = None) -> list[QueryResult]:
        """Text mode: the best ``k`` rows by BM25 per query."""
        results = []
        for query in queries:
            clock = Clock()
            hits, matched = self.top(query, k, bm25_query)
            clock.lap("bm25")
            results.append(QueryResult(query.prompt, query.completion, "text", hits, [], 0.0, matched, clock.total()))
        return results

    def close(self) -> None:
        for index in self.indexes.values():
            index.close()
        for reader in self.readers.values():
            reader.close()
        self.terms.close()


def prefiltered(engine: QueryEngine, search: TextSearch, queries: list[Query], n: int, options: QueryOptions,
                bm25_query: str | None = None) -> list[QueryResult]:
    """The BM25 top ``n`` rows of each query recomputed in full and ranked by their exact
    ``rank_by`` key, as exact mode ranks the index's candidates: the best ``k`` and the ``k`` most
    negative (opponents), each with the ``bm25`` score that let it in.  ``rank_by="hybrid"`` ranks
    the best ``k`` by the reciprocal-rank fusion of the BM25 and the exact normalized order
    (:func:`reciprocal_rank_fusion`); opponents stay the most negative by influence."""
    hybrid = options.rank_by == HYBRID
    results = []
    for query in queries:
        clock = Clock()
        candidates, _ = search.top(query, n, bm25_query)
        clock.lap("bm25")
        rows = [(h.shard, h.row) for h in candidates]
        if hybrid:  # every candidate in influence order, then fused with the BM25 order
            every = dataclasses.replace(options, k=max(1, len(rows)), rank_by=RANK_BY[0], contributions=False)
            result = engine.exact_on(query, rows, every)
            by_row = {(h.shard, h.row): h for h in result.hits}
            fused = reciprocal_rank_fusion([rows, [(h.shard, h.row) for h in result.hits]])[:options.k]
            result.hits = [by_row[row] for row, _ in fused]
            for rank, (hit, (_, score)) in enumerate(zip(result.hits, fused), start=1):
                hit.rank, hit.fused = rank, score
            result.opponents = result.opponents[:options.k]
        else:
            result = engine.exact_on(query, rows, dataclasses.replace(options, contributions=True))
        bm25 = {(h.shard, h.row): h.bm25 for h in candidates}
        for hit in result.hits + result.opponents:
            hit.bm25 = bm25[(hit.shard, hit.row)]
        result.mode = HYBRID if hybrid else "prefilter"
        result.timings_ms = clock.laps | result.timings_ms
        result.timings_ms["total"] += clock.laps["bm25"]
        results.append(result)
    return results
