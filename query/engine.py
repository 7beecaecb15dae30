"""The query engine: query row → FAISS candidates → compressed scores → exact rescoring.

Three modes answer the same question at different costs:

- *index*: the query's gradient is projected into a row (attribdb/rows.py)
  whose inner products with training rows are their compressed scores; FAISS
  finds ``candidates`` rows per query by inner product with it (for the top
  and, negated, for the opponents), and the candidates' stored rows give their
  compressed scores per module.  The best of them by that score are then
  *rescored*: recomputed in full from their stored token ids and re-ranked by
  the uncompressed EK-FAC score.  A few KiB per row cannot hold a gradient's
  cosines to the precision a top 10 needs (tools/evaluations/eval_compression.py); the
  compressed ranking finds the right neighbourhood and recomputation orders
  it.  How many rows are rescored is ``rescore``; by default as many as fit in
  a fixed budget of floating-point operations per query (:data:`RESCORE_FLOPS`),
  so a small model rescores every candidate and a large one on a CPU few or none.
- *exact*: every candidate rescored, and the top rows' scores split into
  per-token contributions.
- *exhaustive*: every row recomputed on the fly (what kronfluence does per
  query batch): the ground truth for tests and benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attribdb import layout
from attribdb.db_index import IndexSet
from attribdb.errors import QueryError
from attribdb.faiss_index import divide_by_norm
from attribdb.influence import eigenbasis_scores, inverse_hvp_self_influence, token_contributions
from attribdb.inspection import existing_shards
from attribdb.progress import progress_bar
from attribdb.query.results import Hit, QueryResult
from attribdb.rows import module_scores
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader
from attribdb.tasks import collate_sequences

DEFAULT_CANDIDATES = 128  # per end, whatever k is (up to k itself), so a query's top k never depends on k
# Floating-point operations per query that default rescoring may spend, per device type: about 2 s
# of one CPU core, or a small fraction of a second of a GPU.  Every candidate of the demo model fits;
# on GPT-2 small on a CPU, none does (tools/benchmarks/bench_query.py prints the trade-off).
RESCORE_FLOPS = {"cpu": 1e11, "cuda": 2e13}
SOLVED_BYTES = 1 << 30  # queries whose inverse-HVPs are held at once are chunked to about this much


RANK_BY = ("normalized", "score")  # the first is the default


def queries_per_chunk(modules, itemsize: int, memory: int, copies: int = 1, most: int | None = None) -> int:
    """How many queries keep ``copies`` gradient-sized tensors each (one number of ``itemsize``
    bytes per tracked weight) within ``memory``: at least one, at most ``most``."""
    per_query = copies * itemsize * sum(m.d_out * m.d_in for m in modules)
    return max(1, min(most or memory, memory // per_query))
BOTH = "both"  # exhaustive mode only: both rankings from one pass over the corpus


def normalized(scores, self_q: float, self_m):
    """score / sqrt(self-influence of query × of row): the cosine of the two preconditioned
    gradients.  Raw scores favour rows with large gradients; this ranks by direction alone.
    It is the default because it did better on both demo evaluations: it found the documents
    stating a fact more often (tools/evaluations/eval_facts.py), and removing its top documents cost the
    retrained model more of the fact (tools/evaluations/eval_counterfactual.py), which is influence itself."""
    return divide_by_norm(scores, self_q * np.asarray(self_m, dtype=np.float64))


def _check_rank_by(rank_by: str | None) -> str:
    """The ranking to use: ``rank_by``, or the default when it is None."""
    if rank_by is None:
        return RANK_BY[0]
    if rank_by not in RANK_BY:
        raise QueryError(f"rank-by must be one of {', '.join(RANK_BY)}, not {rank_by!r}")
    return rank_by


@dataclass(frozen=True)
class Query:
    prompt: str
    completion: str


@dataclass
class _Scored:
    """Scores of candidate rows for one query: parallel arrays, and the query's own
    self-influence (its row's, and once rescoring computed it, its exact one).  Rows recomputed
    in full have ``exact`` set, and come first in both ends (top and opponents)."""

    shards: np.ndarray
    rows: np.ndarray
    scores: np.ndarray  # (N,)
    module_scores: np.ndarray  # (N, modules)
    self_influence: np.ndarray  # (N,)
    query_self: float
    exact_query_self: float = 0.0
    exact: np.ndarray = field(default=None)  # (N,) bool
    exact_scores: np.ndarray = field(default=None)  # (N,)
    exact_module_scores: np.ndarray = field(default=None)  # (N, modules)
    exact_self_influence: np.ndarray = field(default=None)  # (N,)
    first: dict = field(default_factory=dict)  # end ("top" | "bottom") -> (N,) bool: rescored for it

    def __post_init__(self):
        n = len(self.rows)
        if self.exact is None:
            self.exact = np.zeros(n, dtype=bool)
            self.exact_scores, self.exact_self_influence = np.zeros(n), np.zeros(n)
            self.exact_module_scores = np.zeros_like(self.module_scores)

    def key(self, rank_by: str) -> np.ndarray:
        """The compressed ranking key of every row."""
        return self.scores if rank_by == "score" else normalized(self.scores, self.query_self, self.self_influence)

    def exact_key(self, rank_by: str) -> np.ndarray:
        """The exact ranking key (meaningful where ``exact``)."""
        if rank_by == "score":
            return self.exact_scores
        return normalized(self.exact_scores, self.exact_query_self, self.exact_self_influence)


def _exhaustive_scored(columns: list[np.ndarray], self_q: float) -> _Scored:
    """Rows scored in full by an exhaustive pass: shards, rows, (N, modules) scores, self-influence."""
    shards, rows, per_module, self_m = columns
    return _Scored(shards, rows, per_module.sum(1), per_module, self_m, float(self_q))


def _reachable(scored: _Scored, k: int, rankings) -> np.ndarray:
    """Indices, in order, of the rows that can still be among the ``k`` best or ``k`` worst under
    any of ``rankings`` once more rows come: what an exhaustive pass keeps per query instead of
    every row's scores.  A row in the top k of all rows is in the top k of any rows that include
    it, ties broken by their order as over all rows."""
    if len(scored.rows) <= 2 * k * len(rankings):
        return np.arange(len(scored.rows))
    keep = set()
    for ranking in rankings:  # the orders of QueryEngine._ends when no row is rescored
        key = scored.key(ranking)
        keep.update(np.argsort(-key, kind="stable")[:k].tolist())
        keep.update(np.argsort(key, kind="stable")[:k].tolist())
    return np.array(sorted(keep), dtype=np.int64)


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + 1000 * (now - self.last)
        self.last = now

    def total(self) -> dict[str, float]:
        return self.laps | {"total": 1000 * (time.perf_counter() - self.start)}


class _Solved:
    """A chunk of queries' captures, and their inverse-HVPs in the eigenbasis computed on first
    need: rescoring needs them, the query rows do not, so a query that rescores nothing never loads
    the full factors."""

    def __init__(self, runtime: Runtime, captures):
        self.runtime, self.captures = runtime, captures
        self._value = None

    def __call__(self) -> dict[str, torch.Tensor]:
        if self._value is None:
            self._value = self.runtime.computer.rotated_inverse_hvp(self.captures)
        return self._value

    def one(self, i: int) -> dict[str, torch.Tensor]:
        return {name: solved[i] for name, solved in self().items()}

    def self_influence(self) -> np.ndarray:
        return inverse_hvp_self_influence(self.runtime.computer.factors, self()).double().cpu().numpy()


class QueryEngine:
    """Holds a database's model, factors and FAISS indexes for query after query."""

    def __init__(self, runtime: Runtime, shard_ids: list[int] | None = None):
        """``shard_ids`` restricts the engine to some shards (default: all)."""
        self.runtime = runtime
        self.modules = [m.name for m in runtime.manifest.modules]
        self.shards = {shard_id: ShardReader(path, runtime.row_layout)
                       for shard_id, path in existing_shards(runtime.root, runtime.manifest)
                       if shard_ids is None or shard_id in shard_ids}
        self.indexes = IndexSet.open(runtime.root, runtime.manifest, self.shards, runtime.device)
        self.max_tokens = getattr(runtime.model.config, "max_position_embeddings", None) or 1 << 30
        self.flops_per_token = self._flops_per_token()

    @property
    def rows(self) -> int:
        return sum(reader.rows for reader in self.shards.values())

    def close(self) -> None:
        for reader in self.shards.values():
            reader.close()

    # ---- query gradients -------------------------------------------------

    def _tokenize(self, query: Query) -> tuple[list[int], int]:
        if not query.completion.strip():
            raise QueryError("the completion is empty: give the text whose likelihood you want explained")
        tokenizer = self.runtime.tokenizer
        prompt_ids = tokenizer(query.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:  # something must predict the first completion token
            prompt_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        completion_ids = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids
        if len(ids) > self.max_tokens:
            raise QueryError(f"the query is {len(ids)} tokens long; the model takes at most {self.max_tokens}")
        return ids, len(prompt_ids)

    def _query_batch(self, queries: list[Query]) -> dict:
        tokenized = [self._tokenize(q) for q in queries]
        return collate_sequences([ids for ids, _ in tokenized], self.runtime.tokenizer.pad_token_id,
                                 score_from=[start for _, start in tokenized])

    def _solve(self, queries: list[Query]) -> _Solved:
        return _Solved(self.runtime, self.runtime.runner.measurement_captures(self._query_batch(queries))[0])

    def _chunks(self, queries: list[Query]):
        """Queries in groups whose inverse-HVPs (one float per tracked weight each) fit
        :data:`SOLVED_BYTES`: a batch of 720 queries on GPT-2 small would otherwise hold 240 GB."""
        size = queries_per_chunk(self.runtime.manifest.modules, self.runtime.dtype.itemsize, SOLVED_BYTES)
        for start in range(0, len(queries), size):
            yield queries[start:start + size]

    def query_rows(self, queries: list[Query]) -> torch.Tensor:
        """(Q, dim) rows of the queries' measurement gradients: what training rows are matched with."""
        solved = self._solve(queries)
        return self.runtime.projection.encode_query(solved.captures)

    # ---- index mode ------------------------------------------------------

    def query(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              opponents: bool = True, rank_by: str | None = None, rescore: int | None = None,
              contributions: bool = False) -> list[QueryResult]:
        """The best ``k`` of ``max(candidates, k)`` FAISS candidates per end, ordered by ``rank_by``
        after the best ``rescore`` of each end (default: what :data:`RESCORE_FLOPS` allows) are
        recomputed in full.  With a flat index the candidates are the best rows by the stored rows'
        own inner product, so the top k of a query are the first k of any larger k.
        ``contributions`` splits the returned rows' exact scores over their tokens."""
        if not queries:
            return []
        if k <= 0 or candidates <= 0 or (rescore is not None and rescore < 0):
            raise QueryError(f"k and candidates must be positive and rescore not negative, "
                             f"got k={k}, candidates={candidates}, rescore={rescore}")
        rank_by = _check_rank_by(rank_by)
        return [result for chunk in self._chunks(queries)
                for result in self._query_chunk(chunk, k, max(candidates, k), opponents, rank_by, rescore,
                                                contributions)]

    def _query_chunk(self, queries: list[Query], k: int, candidates: int, opponents: bool, rank_by: str,
                     rescore: int | None, contributions: bool) -> list[QueryResult]:
        clock = _Clock()
        solved = self._solve(queries)
        query_rows = self.runtime.projection.encode_query(solved.captures).float()
        self_q = query_rows.double().pow(2).sum(1).cpu().numpy()
        clock.lap("gradient")
        top, bottom = self._candidates(query_rows.cpu().numpy(), candidates, opponents)
        clock.lap("search")
        scored = [self._rescore(query_rows[i:i + 1], top[i] + bottom[i], self_q[i]) for i in range(len(queries))]
        clock.lap("rescore")
        for s in scored:
            s.first = self._to_recompute(s, s.key(rank_by), rescore, opponents)
        if any(end.any() for s in scored for end in s.first.values()):
            self._recompute_scores(scored, solved)
            for s, exact_self in zip(scored, solved.self_influence()):
                s.exact_query_self = float(exact_self)
            clock.lap("exact")
        results = []
        for i, query in enumerate(queries):
            hits, worst = self._ends(scored[i], k, rank_by, opponents)
            if contributions:
                self._contribute(hits + worst, solved.one(i))
            results.append(QueryResult(query.prompt, query.completion, "index", hits, worst,
                                       scored[i].exact_query_self or scored[i].query_self,
                                       len(scored[i].rows), {}, rescored=int(scored[i].exact.sum())))
        clock.lap("metadata")
        for result in results:
            result.timings_ms = {name: value / len(results) for name, value in clock.total().items()}
        return results

    def _candidates(self, query_rows: np.ndarray, candidates: int, opponents: bool) -> tuple[list, list]:
        """Per query, the best ``candidates`` (FAISS score, shard, row) over every shard, and with
        ``opponents`` the most negative ones too: both ends come from one scan of each index."""
        n = len(query_rows)
        both = np.concatenate([query_rows, -query_rows]) if opponents else query_rows
        best = self.indexes.search(both, candidates)
        return best[:n], (best[n:] if opponents else [[] for _ in range(n)])

    def _rescore(self, query_row: torch.Tensor, candidates: list[tuple[float, int, int]], query_self: float) -> _Scored:
        """Compressed scores, per module, of candidate rows from their stored rows."""
        pairs = sorted({(shard_id, row) for _, shard_id, row in candidates})
        shards = np.array([p[0] for p in pairs], dtype=np.int64)
        rows = np.array([p[1] for p in pairs], dtype=np.int64)
        if not pairs:
            return _Scored(shards, rows, np.zeros(0), np.zeros((0, len(self.modules))), np.zeros(0), query_self)
        held = self.indexes.stored_rows(shards, rows, self.runtime.row_layout.dim)  # no file reads
        stored, self_m = [], []
        for reader, wanted in self._by_shard(shards, rows):
            if held is None:
                stored.append(reader.read(layout.ROWS, wanted))
            self_m.append(reader.whole(layout.SELF_INFLUENCE)[wanted])
        self_m = np.concatenate(self_m)
        device = query_row.device
        per_module = module_scores(self.runtime.row_layout, query_row,
                                   torch.from_numpy(np.concatenate(stored) if held is None else held).to(device),
                                   torch.from_numpy(self_m).to(device))[0].double().cpu().numpy()
        return _Scored(shards, rows, per_module.sum(1), per_module, self_m.astype(np.float64), query_self)

    def _by_shard(self, shards: np.ndarray, rows: np.ndarray):
        """(reader, its rows) per shard; for shard-major sorted pairs, concatenating the
        per-shard results gives back the pairs' order."""
        for shard_id in np.unique(shards):
            yield self.shards[int(shard_id)], rows[shards == shard_id]

    # ---- rescoring -------------------------------------------------------

    def _flops_per_token(self) -> float:
        """What recomputing one training token costs: a forward and backward pass (~6 operations
        per weight) plus, per module, rotating δ and a into the eigenbases and forming the rotated
        gradient and its products (~2(d_out² + d_in²) + 4·d_out·d_in)."""
        weights = sum(p.numel() for p in self.runtime.model.parameters())
        rotations = sum(2 * (m.d_out ** 2 + m.d_in ** 2) + 4 * m.d_out * m.d_in for m in self.runtime.manifest.modules)
        return 6.0 * weights + rotations

    def _tokens(self, shard_id: int, row: int) -> int:
        start, end = self.shards[shard_id].metadata([row])[0].token_span
        return end - start

    def _to_recompute(self, scored: _Scored, key: np.ndarray, rescore: int | None,
                      opponents: bool) -> dict[str, np.ndarray]:
        """Per end, a mask of the rows to recompute: its best ``rescore`` by the compressed ``key``,
        or by default, alternating between the ends best first, as many as the device's
        :data:`RESCORE_FLOPS` pays for."""
        orders = {"top": np.argsort(-key, kind="stable")}
        if opponents:
            orders["bottom"] = np.argsort(key, kind="stable")
        first = {end: np.zeros(len(key), dtype=bool) for end in orders}
        if rescore is not None:
            for end, order in orders.items():
                first[end][order[:rescore]] = True
            return first
        budget = RESCORE_FLOPS.get(self.runtime.device.type, RESCORE_FLOPS["cpu"])
        for picks in zip(*orders.values()):
            for end, i in zip(orders, picks):
                if not any(mask[i] for mask in first.values()):
                    budget -= self.flops_per_token * self._tokens(int(scored.shards[i]), int(scored.rows[i]))
                if budget < 0:
                    return first
                first[end][i] = True
        return first

    def _recompute_scores(self, scored: list[_Scored], solved: _Solved) -> None:
        """Exact scores of the rows each query chose, each row recomputed once for all the
        queries that chose it, shortest first so batches carry little padding."""
        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (shard, row) -> [(query, index)]
        for q, s in enumerate(scored):
            for i in np.flatnonzero(np.logical_or.reduce(list(s.first.values()))):
                wanted.setdefault((int(s.shards[i]), int(s.rows[i])), []).append((q, int(i)))
        computer = self.runtime.computer
        token_ids = {pair: self.shards[pair[0]].metadata([pair[1]])[0].token_ids for pair in wanted}
        order = sorted(wanted, key=lambda pair: (len(token_ids[pair]), pair))
        batch_size = self.runtime.manifest.settings.batch_size
        for start in range(0, len(order), batch_size):
            pairs = order[start:start + batch_size]
            batch = collate_sequences([token_ids[p] for p in pairs], self.runtime.tokenizer.pad_token_id)
            captures, _ = computer.runner.train_captures(batch)
            exact = eigenbasis_scores(computer.factors, solved(), captures, self.modules)
            per_module = exact.per_module.double().cpu().numpy()  # (Q, B, M)
            self_m = exact.self_influence.double().cpu().numpy()
            for b, pair in enumerate(pairs):
                for q, i in wanted[pair]:
                    scored[q].exact[i] = True
                    scored[q].exact_module_scores[i] = per_module[q, b]
                    scored[q].exact_scores[i] = per_module[q, b].sum()
                    scored[q].exact_self_influence[i] = self_m[b]

    def _contribute(self, hits: list[Hit], solved: dict[str, torch.Tensor]) -> None:
        """Per-token contributions of hits' exact scores (their rows recomputed once more: only the
        rows shown pay for this)."""
        if not hits:
            return
        token_ids = [self.shards[h.shard].metadata([h.row])[0].token_ids for h in hits]
        computer = self.runtime.computer
        captures, _ = computer.runner.train_captures(collate_sequences(token_ids, self.runtime.tokenizer.pad_token_id))
        split = token_contributions(computer.factors, solved, captures).double().cpu()
        for hit, ids, row in zip(hits, token_ids, split):
            hit.tokens = [self.runtime.tokenizer.decode([t]) for t in ids]
            hit.token_contributions = row[:len(ids)].tolist()

    # ---- ranking ---------------------------------------------------------

    def _ends(self, scored: _Scored, k: int, rank_by: str, opponents: bool) -> tuple[list, list]:
        """The top ``k`` hits and, with ``opponents``, the ``k`` most negative ones: the rows
        recomputed (for either end) first, by their exact key, then the others by their compressed
        one.  A row chosen for the bottom end whose exact score is high belongs at the top."""
        key, exact_key = scored.key(rank_by), scored.exact_key(rank_by)
        hits = self._hits(scored, np.lexsort((-key, -exact_key, ~scored.exact))[:k])
        if not opponents:
            return hits, []
        worst = self._hits(scored, np.lexsort((key, exact_key, ~scored.exact))[:k])
        return hits, [h for h in worst if (h.score if h.exact_score is None else h.exact_score) < 0]

    def _hits(self, scored: _Scored, order: np.ndarray) -> list[Hit]:
        hits = []
        for rank, i in enumerate(order, start=1):
            shard_id, row = int(scored.shards[i]), int(scored.rows[i])
            meta = self.shards[shard_id].metadata([row])[0]
            self_m = float(scored.self_influence[i])
            exact = bool(scored.exact[i])
            self_q = scored.query_self
            module_values = scored.exact_module_scores[i] if exact else scored.module_scores[i]
            hits.append(Hit.from_record(
                meta, shard_id, row, rank=rank, score=float(scored.scores[i]),
                normalized_score=float(normalized(scored.scores[i], self_q, self_m)),
                self_influence=self_m,
                module_scores={name: float(s) for name, s in zip(self.modules, module_values)},
                exact_score=float(scored.exact_scores[i]) if exact else None,
                exact_normalized_score=float(normalized(scored.exact_scores[i], scored.exact_query_self,
                                                        scored.exact_self_influence[i])) if exact else None))
        return hits

    # ---- exact mode ------------------------------------------------------

    def exact(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              rank_by: str | None = None) -> list[QueryResult]:
        """Every candidate recomputed in full and re-ranked by its exact score, the returned rows
        split into per-token contributions."""
        results = self.query(queries, k=k, candidates=candidates, rank_by=rank_by,
                             rescore=max(candidates, k), contributions=True)
        for result in results:
            result.mode = "exact"
        return results

    def exact_on(self, query: Query, rows: list[tuple[int, int]], k: int = 10,
                 rank_by: str | None = None, contributions: bool = True) -> QueryResult:
        """Exact mode on candidates chosen elsewhere (the BM25 prefilter, query/text.py): every
        (shard, row) in ``rows`` recomputed in full, the best ``k`` and most negative ``k`` by
        their exact score returned with per-token contributions (unless ``contributions`` is
        False: they cost the returned rows' recomputation once more)."""
        rank_by = _check_rank_by(rank_by)
        clock = _Clock()
        solved = self._solve([query])
        query_row = self.runtime.projection.encode_query(solved.captures).float()
        scored = self._rescore(query_row, [(0.0, shard, row) for shard, row in rows],
                               float(query_row.double().pow(2).sum()))
        every = np.ones(len(scored.rows), dtype=bool)
        scored.first = {"top": every, "bottom": every}
        if every.any():
            self._recompute_scores([scored], solved)
        scored.exact_query_self = float(solved.self_influence()[0])
        clock.lap("exact")
        hits, worst = self._ends(scored, k, rank_by, opponents=True)
        if contributions:
            self._contribute(hits + worst, solved.one(0))
        clock.lap("metadata")
        return QueryResult(query.prompt, query.completion, "exact", hits, worst, scored.exact_query_self,
                           len(scored.rows), clock.total(), rescored=int(scored.exact.sum()))

    # ---- exhaustive mode ---------------------------------------------------

    def exhaustive(self, queries: list[Query], k: int = 10, batch_size: int | None = None,
                   quiet: bool = True, rank_by: str | None = None) -> list[QueryResult] | dict[str, list[QueryResult]]:
        """Every stored row recomputed from its token ids and scored in full: the ground truth.
        The pass costs a forward and backward over the whole corpus and ranking is free, so
        ``rank_by="both"`` returns ``{"normalized": results, "score": results}`` from one pass.
        Each query keeps only the rows that can still reach an end (:func:`_reachable`), so a pass
        holds a few k rows' scores per query, whatever the corpus size."""
        rankings = RANK_BY if rank_by == BOTH else (_check_rank_by(rank_by),)
        results = {ranking: [] for ranking in rankings}
        for chunk in self._chunks(queries):
            for ranking, ranked in self._exhaustive_chunk(chunk, k, batch_size, quiet, rankings).items():
                results[ranking] += ranked
        return results if rank_by == BOTH else results[rankings[0]]

    def _exhaustive_chunk(self, queries: list[Query], k: int, batch_size: int | None, quiet: bool,
                          rankings: tuple[str, ...]) -> dict[str, list[QueryResult]]:
        clock = _Clock()
        computer = self.runtime.computer
        pad_id = self.runtime.tokenizer.pad_token_id
        solved = self._solve(queries)
        self_q = solved.self_influence()
        batch_size = batch_size or self.runtime.manifest.settings.batch_size
        # per query, the rows that can still reach an end: shards, rows, (N, modules) scores, self-influence
        kept = [[np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(self.modules))), np.zeros(0)]
                for _ in queries]
        with progress_bar("exhaustive", self.rows, quiet) as advance:
            for shard_id, reader in self.shards.items():
                for start in range(0, reader.rows, batch_size):
                    rows = np.arange(start, min(start + batch_size, reader.rows))
                    token_ids = [m.token_ids for m in reader.metadata(rows)]
                    captures, _ = computer.runner.train_captures(collate_sequences(token_ids, pad_id))
                    exact = eigenbasis_scores(computer.factors, solved(), captures, self.modules)
                    per_module = exact.per_module.double().cpu().numpy()  # (Q, B, modules)
                    self_m = exact.self_influence.double().cpu().numpy()
                    for i, columns in enumerate(kept):
                        new = (np.full(len(rows), shard_id), rows, per_module[i], self_m)
                        columns[:] = [np.concatenate([old, more]) for old, more in zip(columns, new)]
                        reachable = _reachable(_exhaustive_scored(columns, self_q[i]), k, rankings)
                        columns[:] = [column[reachable] for column in columns]
                    advance(len(rows))
        clock.lap("score")
        results = {ranking: [] for ranking in rankings}
        for i, query in enumerate(queries):
            scored = _exhaustive_scored(kept[i], self_q[i])
            for ranking in rankings:
                hits, worst = self._ends(scored, k, ranking, opponents=True)
                results[ranking].append(QueryResult(query.prompt, query.completion, "exhaustive", hits, worst,
                                                    float(self_q[i]), self.rows, {}))
        clock.lap("metadata")
        for ranked in results.values():
            for result in ranked:
                result.timings_ms = {name: value / len(queries) for name, value in clock.total().items()}
        return results

    # ---- outliers ----------------------------------------------------------

    def top_self_influence(self, top: int = 10) -> list[Hit]:
        """The rows with the largest self-influence: outliers, memorised or mislabelled data."""
        shards, rows, values = [], [], []
        for shard_id, reader in self.shards.items():
            if reader.rows:
                values.append(reader.read(layout.SELF_INFLUENCE).astype(np.float64))
                rows.append(np.arange(reader.rows))
                shards.append(np.full(reader.rows, shard_id))
        if not values:
            return []
        self_m = np.concatenate(values)
        scored = _Scored(np.concatenate(shards), np.concatenate(rows), self_m,
                         np.zeros((len(self_m), len(self.modules))), self_m, query_self=0.0)
        hits = self._hits(scored, np.argsort(-self_m, kind="stable")[:top])
        for hit in hits:
            hit.module_scores = {}
        return hits
