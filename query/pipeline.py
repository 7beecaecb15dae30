"""The one scoring pipeline every influence mode composes.

    solve → query row → stored-row scores → choose rows to recompute → recompute → ends → contributions

The query's gradient is solved and projected into a row (attribdb/rows.py)
whose inner products with training rows are their compressed scores; the rows
a mode finds for it (FAISS candidates, the BM25 top N, named documents) are
scored from their stored rows per module; the best of them by that score are
recomputed in full from their stored tokens (query/recompute.py) and ranked
by their exact score; the ends are the top and the most negative rows, and the
returned rows' exact scores can be split over their tokens.

Modes differ only in where the rows come from and in their
:class:`~attribdb.query.options.QueryOptions`; named documents order their
rows by rank instead of taking ends (query/named.py), and exhaustive mode
recomputes every row instead of reading stored ones (query/exhaustive.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from attribdb.query.clock import Clock
from attribdb.query.gradients import QueryGradients, SolvedQueries
from attribdb.query.options import Query, QueryOptions
from attribdb.query.recompute import Recomputer
from attribdb.query.results import Hit, QueryResult
from attribdb.query.scored import ScoredRows
from attribdb.query.store import RowStore
from attribdb.runtime import Runtime

RowFinder = Callable[[SolvedQueries], list[list[tuple[int, int]]]]  # per query, the (shard, row) to score


class ScoringPipeline:
    def __init__(self, runtime: Runtime, store: RowStore):
        self.gradients = QueryGradients(runtime)
        self.store = store
        self.recomputer = Recomputer(runtime, store)

    def score(self, queries: list[Query], options: QueryOptions, find_rows: RowFinder,
              clock: Clock) -> tuple[SolvedQueries, list[ScoredRows]]:
        """The pipeline up to the ends: each query's rows scored from the row store, and those that
        ``options.rescore`` (or the compute budget) chooses recomputed in full."""
        solved = self.gradients.solve(queries)
        clock.lap("gradient")
        found = find_rows(solved)
        clock.lap("search")
        scored = [self.store.scores(solved.blocks.one(i), found[i], float(solved.row_self[i]))
                  for i in range(len(queries))]
        clock.lap("rescore")  # the stored-row scores, under the name results have always reported them by
        for s in scored:
            s.chosen = self.recomputer.choose(s, options)
        if any(mask.any() for s in scored for mask in s.chosen.values()):
            self.recomputer.recompute(scored, solved)
            clock.lap("exact")
        return solved, scored

    def answer(self, queries: list[Query], options: QueryOptions, mode: str, find_rows: RowFinder) -> list[QueryResult]:
        """The whole pipeline: per query, its best ``options.k`` rows and, with ``options.opponents``,
        its ``k`` most negative, as a result in ``mode``."""
        clock = Clock()
        solved, scored = self.score(queries, options, find_rows, clock)
        results = []
        for i, query in enumerate(queries):
            top, bottom = scored[i].ends(options.k, options.rank_by, options.opponents)
            hits, opponents = self.hits(scored[i], top), self.hits(scored[i], bottom)
            if options.contributions:
                self.recomputer.contributions(hits + opponents, solved.one(i))
            results.append(QueryResult(query.prompt, query.completion, mode, hits, opponents,
                                       scored[i].reported_query_self, len(scored[i].rows), {},
                                       rescored=int(scored[i].exact.sum())))
        clock.lap("metadata")
        for result in results:
            result.timings_ms = clock.per_query(len(results))
        return results

    def hits(self, scored: ScoredRows, order: np.ndarray) -> list[Hit]:
        """Hits of a query's rows at ``order``, ranked 1, 2, ... in that order."""
        records = self.store.records([(scored.shards[i], scored.rows[i]) for i in order])
        return scored.hits(order, records, self.store.modules)
