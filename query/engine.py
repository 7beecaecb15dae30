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

A trajectory database answers every mode over its checkpoints (all of them,
or those ``QueryOptions.checkpoints`` names): each checkpoint's model,
factors and rows load on the first query that asks for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from attribdb.errors import QueryError
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
        """``runtime``: the database's model (checkpoint 0); ``shard_ids`` restricts the engine to
        some shards (default: all)."""
        self.runtime = runtime
        self.store = RowStore(runtime, shard_ids)
        self._checkpoints: dict[int, tuple[Runtime, RowStore]] = {0: (runtime, self.store)}
        self._pipelines: dict[tuple[int, ...], ScoringPipeline] = {}

    @property
    def rows(self) -> int:
        return self.store.rows

    @property
    def pipeline(self) -> ScoringPipeline:
        """The pipeline over every checkpoint (a single model's: over the model)."""
        return self.pipeline_for(None)

    def pipeline_for(self, names: tuple[str, ...] | None) -> ScoringPipeline:
        """The pipeline over the checkpoints ``names`` (None: all of them), loading each on first need."""
        manifest = self.runtime.manifest
        known = manifest.checkpoint_names()
        unknown = [name for name in names or () if name not in known]
        if unknown:
            raise QueryError(f"unknown checkpoint {unknown[0]!r}; this database holds {', '.join(known)}")
        chosen = tuple(range(len(known))) if names is None else tuple(sorted({known.index(n) for n in names}))
        if chosen not in self._pipelines:
            for c in chosen:
                if c not in self._checkpoints:
                    runtime = Runtime.load(self.runtime.root, device=str(self.runtime.device), checkpoint=c,
                                           manifest=manifest)
                    self._checkpoints[c] = (runtime, RowStore(runtime, base=self.store))
            runtimes, stores = zip(*(self._checkpoints[c] for c in chosen))
            trajectory = bool(manifest.checkpoints)
            self._pipelines[chosen] = ScoringPipeline(
                list(runtimes), list(stores), tuple(manifest.checkpoints[c].weight for c in chosen) if trajectory
                else (1.0,), tuple(known[c] for c in chosen) if trajectory else ())
        return self._pipelines[chosen]

    @property
    def _model_pipeline(self) -> ScoringPipeline:
        """The pipeline over the database's model (checkpoint 0) alone, which loads no other checkpoint."""
        return self.pipeline_for(tuple(self.runtime.manifest.checkpoint_names()[:1]))

    def close(self) -> None:
        for _, store in reversed(self._checkpoints.values()):  # views before the shards they read through
            store.close()

    def query_sketches(self, queries: list[Query]) -> torch.Tensor:
        """(Q, sketch_dim) sketches of the queries' measurement gradients: what the indexes match
        the training rows' sketches with."""
        return self._model_pipeline.gradients.solve(queries).sketches

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
        pipeline = self.pipeline_for(options.checkpoints)
        description = "query" if mode == "index" else mode
        size = self._chunk_size(batches.QUERY_BUDGET, pipeline)
        # index chunks as large as an exhaustive pass takes, so a chunk that takes one takes one pass
        outer = max(size, self._chunk_size(batches.EXHAUSTIVE_BUDGET, pipeline)) if mode == "index" else size
        for chunk in batches.in_chunks(queries, outer, description, quiet):
            if mode == "index" and self._exhaustive_is_cheaper(pipeline, len(chunk), options):
                yield from exhaustive_pass(pipeline, chunk, options, quiet=True)[options.rank_by]
                continue
            for start in range(0, len(chunk), size):
                yield from pipeline.answer(chunk[start:start + size], options, mode,
                                           lambda solved: pipeline.search(solved, options))

    @staticmethod
    def _exhaustive_is_cheaper(pipeline: ScoringPipeline, queries: int, options: QueryOptions) -> bool:
        """Whether a batch's index queries, at their default recomputation, would cost more than
        one exhaustive pass, which recomputes every row once (at each checkpoint) for all of them
        and is exact: a batch then never costs more per query than the exhaustive pass.  A single
        query, or one whose ``rescore`` the caller chose, always takes the index path it asked for."""
        if queries < 2 or options.rescore is not None:  # priced only when it could switch: pricing reads rows
            return False
        checkpoints = len(pipeline.recomputers)
        index = sum(recomputer.index_flops(options, checkpoints) for recomputer in pipeline.recomputers)
        return queries * index >= sum(recomputer.exhaustive_flops() for recomputer in pipeline.recomputers)

    def exact_on(self, query: Query, rows: list[tuple[int, int]], options: QueryOptions) -> QueryResult:
        """Exact mode on rows chosen elsewhere (the BM25 prefilter, query/text.py): every (shard,
        row) in ``rows`` recomputed in full, the best ``k`` and most negative ``k`` by their exact
        score returned, with per-token contributions where ``options.contributions`` asks."""
        every = dataclasses.replace(options, rescore=len(rows))
        return self.pipeline_for(options.checkpoints).answer([query], every, "exact", lambda solved: [rows])[0]

    def exhaustive(self, queries: list[Query], options: QueryOptions,
                   quiet: bool = False) -> dict[str, list[QueryResult]]:
        """Every stored row recomputed from its token ids and scored in full: the ground truth, per
        ranking of ``options.rankings`` (both from the same passes for ``rank_by="both"``).  Each
        chunk of queries is one pass over the corpus."""
        results = {ranking: [] for ranking in options.rankings}
        pipeline = self.pipeline_for(options.checkpoints)
        chunk_size = self._chunk_size(batches.EXHAUSTIVE_BUDGET, pipeline)
        for chunk in batches.in_chunks(queries, chunk_size, "queries", quiet):
            for ranking, ranked in exhaustive_pass(pipeline, chunk, options, quiet).items():
                results[ranking] += ranked
        return results

    def _chunk_size(self, budget: batches.ChunkBudget, pipeline: ScoringPipeline) -> int:
        """Queries per chunk: their gradients at every checkpoint of ``pipeline`` fit ``budget``."""
        each = batches.queries_per_chunk(self.runtime.manifest.modules, self.runtime.dtype.itemsize, budget)
        return max(1, each // len(pipeline.stores))

    def top_self_influence(self, top: int) -> list[Hit]:
        """The rows with the largest self-influence: outliers, memorised or mislabelled data."""
        shards, rows, self_m = self.store.every_row()
        scored = ScoredRows(shards, rows, self_m, np.zeros((len(self_m), len(self.store.modules))), self_m,
                            query_self=0.0)
        hits = self._model_pipeline.hits(scored, np.argsort(-self_m, kind="stable")[:top])
        for hit in hits:
            hit.module_scores = {}
        return hits
