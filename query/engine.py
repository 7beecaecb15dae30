"""The query engine: a database's model, row store and indexes, loaded once, and its query modes.

Each mode is the scoring pipeline (query/pipeline.py) with its own rows and
options, answering the same question at different costs:

- *index*: FAISS finds ``candidates`` rows per end by inner product with the
  query row; their stored rows give their compressed scores per module, and
  the best of them by that score are recomputed in full and re-ranked by the
  uncompressed EK-FAC score (how many: ``rescore``, query/recompute.py).
- *exact*: every candidate recomputed, and the returned rows' scores split
  into per-token contributions.
- *exact on given rows*: the same on rows chosen elsewhere (the BM25
  prefilter, query/text.py).
- *exhaustive*: every row recomputed on the fly (query/exhaustive.py).

Named documents (query/named.py) and text search (query/text.py) build on these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from attribdb.query import batches
from attribdb.query.exhaustive import exhaustive_pass
from attribdb.query.options import Query, QueryOptions
from attribdb.query.pipeline import ScoringPipeline
from attribdb.query.results import Hit, QueryResult
from attribdb.query.scored import ScoredRows
from attribdb.query.store import RowStore
from attribdb.runtime import Runtime


class QueryEngine:
    """Holds a database's model, factors and FAISS indexes for query after query."""

    def __init__(self, runtime: Runtime, shard_ids: list[int] | None = None):
        """``shard_ids`` restricts the engine to some shards (default: all)."""
        self.runtime = runtime
        self.store = RowStore(runtime, shard_ids)
        self.pipeline = ScoringPipeline(runtime, self.store)

    @property
    def rows(self) -> int:
        return self.store.rows

    def close(self) -> None:
        self.store.close()

    def query_sketches(self, queries: list[Query]) -> torch.Tensor:
        """(Q, sketch_dim) sketches of the queries' measurement gradients: what the indexes match
        the training rows' sketches with."""
        return self.pipeline.gradients.solve(queries).sketches

    def query(self, queries: list[Query], options: QueryOptions, quiet: bool = True) -> Iterator[QueryResult]:
        """Index mode: per end, the best ``k`` of ``options.pool`` FAISS candidates, ordered by
        ``rank_by`` after the best ``rescore`` of each end (default: what the compute budget
        allows) are recomputed in full.  The candidates do not depend on k (up to ``pool``), so
        the top k of a query are the first k of any larger k.
        A chunk of queries whose default recomputation would cost more than recomputing every row
        once is answered by one exhaustive pass instead (exact, in mode "exhaustive").  Results
        come chunk by chunk, with a progress bar of queries unless ``quiet``."""
        return self._indexed(queries, options, "index", quiet)

    def exact(self, queries: list[Query], options: QueryOptions, quiet: bool = True) -> Iterator[QueryResult]:
        """Exact mode: every candidate recomputed in full and ranked by its exact score, the
        returned rows split into per-token contributions."""
        return self._indexed(queries, options.exact(), "exact", quiet)

    def _indexed(self, queries: list[Query], options: QueryOptions, mode: str, quiet: bool) -> Iterator[QueryResult]:
        def candidates(solved) -> list[list[tuple[int, int]]]:
            return self.store.search(solved.sketches.cpu().numpy(), options.pool, options.opponents)

        description = "query" if mode == "index" else mode
        for chunk in batches.in_chunks(queries, self._chunk_size(batches.QUERY_BUDGET), description, quiet):
            if mode == "index" and self._exhaustive_is_cheaper(len(chunk), options):
                yield from exhaustive_pass(self.pipeline, chunk, options, quiet=True)[options.rank_by]
            else:
                yield from self.pipeline.answer(chunk, options, mode, candidates)

    def _exhaustive_is_cheaper(self, queries: int, options: QueryOptions) -> bool:
        """Whether a batch's index queries, at their default recomputation, would cost more than
        one exhaustive pass, which recomputes every row once for all of them and is exact: a batch
        then never costs more per query than the exhaustive pass.  A single query, or one whose
        ``rescore`` the caller chose, always takes the index path it asked for."""
        recomputer = self.pipeline.recomputer
        return (queries > 1 and options.rescore is None
                and queries * recomputer.index_flops(options) >= recomputer.exhaustive_flops())

    def exact_on(self, query: Query, rows: list[tuple[int, int]], options: QueryOptions) -> QueryResult:
        """Exact mode on rows chosen elsewhere (the BM25 prefilter, query/text.py): every (shard,
        row) in ``rows`` recomputed in full, the best ``k`` and most negative ``k`` by their exact
        score returned, with per-token contributions where ``options.contributions`` asks."""
        every = dataclasses.replace(options, rescore=len(rows))
        return self.pipeline.answer([query], every, "exact", lambda solved: [rows])[0]

    def exhaustive(self, queries: list[Query], options: QueryOptions,
                   quiet: bool = False) -> dict[str, list[QueryResult]]:
        """Every stored row recomputed from its token ids and scored in full: the ground truth, per
        ranking of ``options.rankings`` (both from the same passes for ``rank_by="both"``).  Each
        chunk of queries is one pass over the corpus."""
        results = {ranking: [] for ranking in options.rankings}
        for chunk in batches.in_chunks(queries, self._chunk_size(batches.EXHAUSTIVE_BUDGET), "queries", quiet):
            for ranking, ranked in exhaustive_pass(self.pipeline, chunk, options, quiet).items():
                results[ranking] += ranked
        return results

    def _chunk_size(self, budget: batches.ChunkBudget) -> int:
        return batches.queries_per_chunk(self.runtime.manifest.modules, self.runtime.dtype.itemsize, budget)

    def top_self_influence(self, top: int) -> list[Hit]:
        """The rows with the largest self-influence: outliers, memorised or mislabelled data."""
        shards, rows, self_m = self.store.every_row()
        scored = ScoredRows(shards, rows, self_m, np.zeros((len(self_m), len(self.store.modules))), self_m,
                            query_self=0.0)
        hits = self.pipeline.hits(scored, np.argsort(-self_m, kind="stable")[:top])
        for hit in hits:
            hit.module_scores = {}
        return hits
