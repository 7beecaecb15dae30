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

Over a trajectory (a database of several checkpoints, attribdb/manifest.py
Checkpoint) every step runs at each chosen checkpoint with its own model,
factors and rows: the query is solved at each, each checkpoint's index hands
on its candidates and their union is scored at every checkpoint, the chosen
rows are recomputed at every checkpoint, and the scores are summed with the
checkpoints' weights (query/scored.py ScoredRows.combine).  Candidates come
per checkpoint because no index holds a weighted sum of sketches whose
weights and checkpoints a query chooses; a row whose summed key is high has
a high key at one checkpoint at least (a sum of C terms of at least x has a
term of at least x/C), so the union catches what one combined search would.
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

RowFinder = Callable[[list[SolvedQueries]], list[list[tuple[int, int]]]]  # per query, the (shard, row) to score


class ScoringPipeline:
    """The pipeline at one or more checkpoints (``runtimes`` and their ``stores``, weighed by
    ``weights``); ``names`` are the checkpoints' for a trajectory database, () for a single model."""

    def __init__(self, runtimes: list[Runtime], stores: list[RowStore], weights: tuple[float, ...] = (1.0,),
                 names: tuple[str, ...] = ()):
        self.all_gradients = [QueryGradients(runtime) for runtime in runtimes]
        self.stores = stores
        self.recomputers = [Recomputer(runtime, store) for runtime, store in zip(runtimes, stores)]
        self.weights, self.names = tuple(weights), tuple(names)

    @property
    def gradients(self) -> QueryGradients:
        """The first checkpoint's (for a single model: the model's)."""
        return self.all_gradients[0]

    @property
    def store(self) -> RowStore:
        """The first checkpoint's rows; the sequences' records and shards are every checkpoint's."""
        return self.stores[0]

    @property
    def recomputer(self) -> Recomputer:
        return self.recomputers[0]

    def solve(self, queries: list[Query]) -> list[SolvedQueries]:
        """The queries solved at each checkpoint."""
        return [gradients.solve(queries) for gradients in self.all_gradients]

    def combined(self, parts: list[ScoredRows]) -> ScoredRows:
        """The same rows scored at each checkpoint, as one set of scores (a single model's: its own)."""
        return ScoredRows.combine(parts, self.weights, self.names) if self.names else parts[0]

    def search(self, solved: list[SolvedQueries], options: QueryOptions) -> list[list[tuple[int, int]]]:
        """Per query, the candidates of every checkpoint's index: ``options.pool`` per end in all,
        shared between the checkpoints (at least ``k`` each)."""
        each = max(options.k, -(-options.pool // len(self.stores)))
        found = [store.search(s.sketches.cpu().numpy(), each, options.opponents)
                 for store, s in zip(self.stores, solved)]
        return [[pair for per_checkpoint in found for pair in per_checkpoint[i]] for i in range(len(found[0]))]

    def stored_scores(self, solved: list[SolvedQueries], i: int, pairs) -> ScoredRows:
        """Query ``i``'s stored-row scores of the rows at (shard, row) ``pairs``, at every checkpoint."""
        return self.combined([store.scores(s.blocks.one(i), pairs, float(s.row_self[i]))
                              for store, s in zip(self.stores, solved)])

    def score(self, queries: list[Query], options: QueryOptions, find_rows: RowFinder,
              clock: Clock) -> tuple[list[SolvedQueries], list[ScoredRows]]:
        """The pipeline up to the ends: each query's rows scored from the row store, and those that
        ``options.rescore`` (or the compute budget) chooses recomputed in full."""
        solved = self.solve(queries)
        clock.lap("gradient")
        found = find_rows(solved)
        clock.lap("search")
        parts = [[store.scores(s.blocks.one(i), found[i], float(s.row_self[i])) for i in range(len(queries))]
                 for store, s in zip(self.stores, solved)]  # [checkpoint][query]
        clock.lap("rescore")  # the stored-row scores, under the name results have always reported them by
        for i in range(len(queries)):
            chosen = self.recomputer.choose(self.combined([p[i] for p in parts]), options, len(self.stores))
            for p in parts:
                p[i].chosen = chosen
        if any(mask.any() for s in parts[0] for mask in s.chosen.values()):
            for recomputer, p, s in zip(self.recomputers, parts, solved):
                recomputer.recompute(p, s)
            clock.lap("exact")
        return solved, [self.combined([p[i] for p in parts]) for i in range(len(queries))]

    def contributions(self, hits: list[Hit], solved: list[SolvedQueries], i: int) -> None:
        """Per-token contributions of the hits' exact scores for query ``i``: summed over the
        checkpoints with their weights, as the scores are."""
        totals = [0.0] * len(hits)
        for weight, recomputer, s in zip(self.weights, self.recomputers, solved):
            recomputer.contributions(hits, s.one(i))
            totals = [total + weight * np.asarray(h.token_contributions) for h, total in zip(hits, totals)]
        for hit, total in zip(hits, totals):
            hit.token_contributions = total.tolist()

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
                self.contributions(hits + opponents, solved, i)
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
