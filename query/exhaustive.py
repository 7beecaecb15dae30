"""Exhaustive mode: every stored row recomputed from its token ids and scored in full.

What kronfluence does per query batch, and the ground truth of tests and
benchmarks.  The pipeline's first and last steps (solve; ends) with every row
recomputed in between instead of scored from its stored row.  The pass costs
a forward and backward over the whole corpus and ranking is free, so one pass
can rank both ways; each query keeps only the rows that can still reach an end
(:meth:`ScoredRows.reachable`), so a pass holds a few k rows' scores per query,
whatever the corpus size.
"""

from __future__ import annotations

import numpy as np

from attribdb.progress import progress_bar
from attribdb.query.clock import Clock
from attribdb.query.options import Query, QueryOptions
from attribdb.query.pipeline import ScoringPipeline
from attribdb.query.results import QueryResult
from attribdb.query.scored import ScoredRows


def _scored(columns: list[np.ndarray], self_q: float) -> ScoredRows:
    """Rows scored in full, from their columns: shards, rows, (N, modules) scores, self-influence."""
    shards, rows, per_module, self_m = columns
    return ScoredRows(shards, rows, per_module.sum(1), per_module, self_m, float(self_q))


def exhaustive_pass(pipeline: ScoringPipeline, queries: list[Query], options: QueryOptions,
                    quiet: bool) -> dict[str, list[QueryResult]]:
    """One pass over every row for a chunk of queries: per ranking of ``options.rankings``, their
    results.  Over a trajectory each row is recomputed at every checkpoint, and what a query keeps
    is decided by the summed scores (ScoringPipeline.combined)."""
    clock = Clock()
    store = pipeline.store
    solved = pipeline.solve(queries)
    self_q = [s.exact_self_influence for s in solved]  # [checkpoint] (Q,)
    rankings = options.rankings
    kept = [[[np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(store.modules))), np.zeros(0)]
             for _ in solved] for _ in queries]  # [query][checkpoint] columns

    def scored(i: int) -> ScoredRows:
        """Query ``i``'s kept rows, scored over the checkpoints."""
        return pipeline.combined([_scored(columns, self_q[c][i]) for c, columns in enumerate(kept[i])])
    batch_size = pipeline.recomputer.batch_size
    with progress_bar("exhaustive", store.rows, quiet) as advance:
        for shard_id, reader in store.shards.items():
            for start in range(0, reader.rows, batch_size):
                rows = np.arange(start, min(start + batch_size, reader.rows))
                token_ids = [record.token_ids for record in reader.metadata(rows)]
                computed = [recomputer.row_scores(token_ids, s.inverse_hvp)  # (Q, B, modules), (B,)
                            for recomputer, s in zip(pipeline.recomputers, solved)]
                for i, per_checkpoint in enumerate(kept):
                    for columns, (per_module, self_m) in zip(per_checkpoint, computed):
                        new = (np.full(len(rows), shard_id), rows, per_module[i], self_m)
                        columns[:] = [np.concatenate([old, more]) for old, more in zip(columns, new)]
                    reachable = scored(i).reachable(options.k, rankings)
                    for columns in per_checkpoint:
                        columns[:] = [column[reachable] for column in columns]
                advance(len(rows))
    clock.lap("score")
    results = {ranking: [] for ranking in rankings}
    for i, query in enumerate(queries):
        final = scored(i)
        for ranking in rankings:
            top, bottom = final.ends(options.k, ranking, options.opponents)
            results[ranking].append(QueryResult(query.prompt, query.completion, "exhaustive",
                                                pipeline.hits(final, top), pipeline.hits(final, bottom),
                                                final.query_self, store.rows, {}))
    clock.lap("metadata")
    for ranked in results.values():
        for result in ranked:
            result.timings_ms = clock.per_query(len(queries))
    return results
