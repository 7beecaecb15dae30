"""The query engine: query gradient → sketch → FAISS candidates → exact rescoring.

Three modes answer the same question at different costs:

- *index*: FAISS finds ``candidates`` rows per query by sketch inner product
  (for the top and, with the negated sketch, for the opponents); their stored
  low-rank factors are rescored exactly, and the best ``k`` are returned.
- *exact*: the index answer, then the top rows' full gradients recomputed
  from their stored token ids: the EK-FAC score with no compression, split
  into per-token contributions.
- *exhaustive*: every row recomputed on the fly (what kronfluence does per
  query batch): the ground truth for tests and benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from attribdb import layout
from attribdb.compression import low_rank_scores
from attribdb.errors import QueryError
from attribdb.faiss_index import divide_by_norm, search
from attribdb.influence import Preconditioned, per_module_scores, self_influence, token_contributions
from attribdb.inspection import existing_shards
from attribdb.progress import progress_bar
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader
from attribdb.tasks import collate_sequences
from query.results import Hit, QueryResult

DEFAULT_CANDIDATES = 128  # per end; recall@10 was the same from 96 to 256 (tools/bench_query.py)


RANK_BY = ("normalized", "score")  # the first is the default


def normalized(scores, self_q: float, self_m):
    """score / sqrt(self-influence of query × of row): the cosine of the two preconditioned
    gradients.  Raw scores favour rows with large gradients; this ranks by direction alone.
    It is the default because it did better on both demo evaluations: it found the documents
    stating a fact more often (tools/eval_facts.py), and removing its top documents cost the
    retrained model more of the fact (tools/eval_counterfactual.py), which is influence itself."""
    return divide_by_norm(scores, self_q * np.asarray(self_m, dtype=np.float64))


def _check_rank_by(rank_by: str | None) -> str:
    """The ranking to use: ``rank_by``, or the default when it is None."""
    if rank_by is None:
        return RANK_BY[0]
    if rank_by not in RANK_BY:
        raise QueryError(f"rank-by must be one of {', '.join(RANK_BY)}, not {rank_by!r}")
    return rank_by


def _ranking_key(scored: "_Scored", self_q: float, rank_by: str) -> np.ndarray:
    return scored.scores if rank_by == "score" else normalized(scored.scores, self_q, scored.self_influence)


def _exact_key(hit: Hit, self_q: float, rank_by: str) -> float:
    return hit.exact_score if rank_by == "score" else float(normalized(hit.exact_score, self_q, hit.self_influence))


@dataclass(frozen=True)
class Query:
    prompt: str
    completion: str


@dataclass
class _Scored:
    """Scores of candidate rows for one query: parallel arrays."""

    shards: np.ndarray
    rows: np.ndarray
    scores: np.ndarray  # (N,)
    module_scores: np.ndarray  # (N, modules)
    self_influence: np.ndarray  # (N,)


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


class QueryEngine:
    """Holds a database's model, factors and FAISS indexes for query after query."""

    def __init__(self, runtime: Runtime, shard_ids: list[int] | None = None):
        """``shard_ids`` restricts the engine to some shards (default: all)."""
        self.runtime = runtime
        self.modules = [m.name for m in runtime.manifest.modules]
        self.shards = {shard_id: ShardReader(path, runtime.row_layout)
                       for shard_id, path in existing_shards(runtime.root, runtime.manifest)
                       if shard_ids is None or shard_id in shard_ids}
        self.indexes = {shard_id: reader.index() for shard_id, reader in self.shards.items() if reader.rows}
        self.max_tokens = getattr(runtime.model.config, "max_position_embeddings", None) or 1 << 30

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

    def preconditioned(self, queries: list[Query]) -> Preconditioned:
        return self.runtime.computer.query_preconditioned(self._query_batch(queries))

    # ---- index mode ------------------------------------------------------

    def query(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              opponents: bool = True, rerank: int | None = None, rank_by: str | None = None) -> list[QueryResult]:
        """``rerank`` best (and worst) rows by their head score get their tail triplets added, where
        the database stores a tail (default 3k); ``rank_by`` orders the rescored candidates."""
        if not queries:
            return []
        if k <= 0 or candidates < k:
            raise QueryError(f"need 0 < k <= candidates, got k={k}, candidates={candidates}")
        rank_by = _check_rank_by(rank_by)
        rerank = 3 * k if rerank is None else rerank
        clock = _Clock()
        pre = self.preconditioned(queries)
        sketches = self.runtime.sketcher.sketch(pre).cpu().numpy()
        self_q = self_influence(pre).cpu().numpy()
        clock.lap("gradient")
        top, bottom = self._candidates(sketches, candidates, opponents)
        clock.lap("search")
        results = []
        for i, query in enumerate(queries):
            query_pre = {name: g[i:i + 1] for name, g in pre.items()}
            scored = self._rescore(query_pre, top[i] + bottom[i])
            clock.lap("rescore")
            self._add_tail(query_pre, scored, _ranking_key(scored, self_q[i], rank_by), rerank, opponents)
            clock.lap("rerank")
            hits, worst = self._ends(scored, self_q[i], k, rank_by, opponents)
            clock.lap("metadata")
            results.append(QueryResult(query.prompt, query.completion, "index", hits, worst, float(self_q[i]),
                                       len(scored.rows), {}))
        for result in results:
            result.timings_ms = {name: value / len(results) for name, value in clock.total().items()}
        return results

    def _candidates(self, sketches: np.ndarray, candidates: int, opponents: bool) -> tuple[list, list]:
        """Per query, the best ``candidates`` (sketch score, shard, row) over every shard, and with
        ``opponents`` the most negative ones too: both ends come from one scan of each index."""
        n = len(sketches)
        both = np.concatenate([sketches, -sketches]) if opponents else sketches
        merged = [[] for _ in range(len(both))]
        for shard_id, index in self.indexes.items():
            scores, ids = search(index, both, candidates)
            for i in range(len(both)):
                merged[i] += [(float(s), shard_id, int(r)) for s, r in zip(scores[i], ids[i]) if r >= 0]
        best = [sorted(found, reverse=True)[:candidates] for found in merged]
        return best[:n], (best[n:] if opponents else [[] for _ in range(n)])

    def _rescore(self, pre: Preconditioned, candidates: list[tuple[float, int, int]]) -> _Scored:
        """Exact scores of candidate rows against their stored low-rank factors."""
        pairs = sorted({(shard_id, row) for _, shard_id, row in candidates})
        shards = np.array([p[0] for p in pairs], dtype=np.int64)
        rows = np.array([p[1] for p in pairs], dtype=np.int64)
        if not pairs:
            return _Scored(shards, rows, np.zeros(0), np.zeros((0, len(self.modules))), np.zeros(0))
        module_scores = self._module_scores(pre, shards, rows, layout.LOWRANK, layout.SIGMA, self.runtime.row_layout)
        self_m = np.concatenate([reader.whole(layout.SELF_INFLUENCE)[wanted]
                                 for reader, wanted in self._by_shard(shards, rows)])
        return _Scored(shards, rows, module_scores.sum(1), module_scores, self_m)

    def _add_tail(self, pre: Preconditioned, scored: _Scored, key: np.ndarray, rerank: int, opponents: bool) -> None:
        """Add the tail triplets' part of the score to the best (and worst) ``rerank`` rows by
        ``key``: a closer ranking at the top for a few more reads."""
        row_layout = self.runtime.row_layout
        if not row_layout.tail_rank or not rerank or not len(scored.rows):
            return
        chosen = set(np.argsort(-key, kind="stable")[:rerank].tolist())
        if opponents:
            chosen |= set(np.argsort(key, kind="stable")[:rerank].tolist())
        chosen = np.array(sorted(chosen))  # shard-major order, as the rows are
        extra = self._module_scores(pre, scored.shards[chosen], scored.rows[chosen], layout.TAIL, layout.TAIL_SIGMA,
                                    row_layout.tail)
        scored.module_scores[chosen] += extra
        scored.scores[chosen] = scored.module_scores[chosen].sum(1)

    def _module_scores(self, pre: Preconditioned, shards: np.ndarray, rows: np.ndarray, packed_name: str,
                       sigma_name: str, row_layout) -> np.ndarray:
        """(N, modules) scores of rows against one packed factor array, for shard-major sorted
        (shard, row) pairs: read shard by shard, scored together, one GEMM per module."""
        packed, sigma = [], []
        for reader, wanted in self._by_shard(shards, rows):
            packed.append(reader.read(packed_name, wanted))
            sigma.append(reader.whole(sigma_name)[wanted])
        packed_rows = torch.from_numpy(np.concatenate(packed)).float()  # one conversion, not per module
        sigmas = torch.from_numpy(np.concatenate(sigma))
        columns = []
        for j, name in enumerate(self.modules):
            u, v = row_layout.unpack(packed_rows, name)
            columns.append(low_rank_scores(pre[name], u, v, sigmas[:, j])[0])
        return torch.stack(columns, dim=1).double().cpu().numpy()

    def _by_shard(self, shards: np.ndarray, rows: np.ndarray):
        """(reader, its rows) per shard; for shard-major sorted pairs, concatenating the
        per-shard results gives back the pairs' order."""
        for shard_id in np.unique(shards):
            yield self.shards[int(shard_id)], rows[shards == shard_id]

    def _ends(self, scored: _Scored, self_q: float, k: int, rank_by: str, opponents: bool) -> tuple[list, list]:
        """The top ``k`` hits and, with ``opponents``, the ``k`` most negative ones."""
        key = _ranking_key(scored, self_q, rank_by)
        hits = self._hits(scored, np.argsort(-key, kind="stable")[:k], self_q)
        worst = self._hits(scored, np.argsort(key, kind="stable")[:k], self_q) if opponents else []
        return hits, [h for h in worst if h.score < 0]

    def _hits(self, scored: _Scored, order: np.ndarray, self_q: float) -> list[Hit]:
        hits = []
        for rank, i in enumerate(order, start=1):
            shard_id, row = int(scored.shards[i]), int(scored.rows[i])
            meta = self.shards[shard_id].metadata([row])[0]
            self_m = float(scored.self_influence[i])
            hits.append(Hit(
                rank=rank, score=float(scored.scores[i]),
                normalized_score=float(normalized(scored.scores[i], self_q, self_m)),
                self_influence=self_m,
                module_scores={name: float(s) for name, s in zip(self.modules, scored.module_scores[i])},
                doc_id=meta["doc_id"], source=meta["source"], token_span=meta["token_span"],
                char_span=meta.get("char_span", [0, len(meta["text"])]), text=meta["text"],
                shard=shard_id, row=row))
        return hits

    # ---- exact mode ------------------------------------------------------

    def exact(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              refine: int | None = None, rank_by: str | None = None) -> list[QueryResult]:
        """Index answers refined without compression: the best ``refine`` rows (default 3k) by
        low-rank score are recomputed in full from their tokens, re-ranked by their exact
        score, and split into per-token contributions."""
        refine = max(k, refine or 3 * k)
        rank_by = _check_rank_by(rank_by)
        results = self.query(queries, k=refine, candidates=max(candidates, refine), rank_by=rank_by)
        computer = self.runtime.computer
        for query, result in zip(queries, results):
            started = time.perf_counter()
            inverse_hvp = {name: r[0] for name, r in computer.query_inverse_hvp(self._query_batch([query])).items()}
            self._recompute(result.hits + result.opponents, inverse_hvp)
            key = partial(_exact_key, self_q=result.query_self_influence, rank_by=rank_by)
            result.hits = sorted(result.hits, key=key, reverse=True)[:k]
            result.opponents = [h for h in sorted(result.opponents, key=key) if h.exact_score < 0][:k]
            for hits in (result.hits, result.opponents):
                for rank, hit in enumerate(hits, start=1):
                    hit.rank = rank
            result.mode = "exact"
            result.timings_ms["exact"] = 1000 * (time.perf_counter() - started)
            result.timings_ms["total"] += result.timings_ms["exact"]
        return results

    def _recompute(self, hits: list[Hit], inverse_hvp: dict[str, torch.Tensor]) -> None:
        if not hits:
            return
        metas = [self.shards[h.shard].metadata([h.row])[0] for h in hits]
        token_ids = [m["token_ids"] for m in metas]
        batch = collate_sequences(token_ids, self.runtime.tokenizer.pad_token_id)
        captures, _ = self.runtime.computer.runner.train_captures(batch)
        contributions = token_contributions(inverse_hvp, captures).double().cpu()
        for hit, ids, row in zip(hits, token_ids, contributions):
            hit.tokens = [self.runtime.tokenizer.decode([t]) for t in ids]
            hit.token_contributions = row[:len(ids)].tolist()
            hit.exact_score = float(row.sum())

    # ---- exhaustive mode ---------------------------------------------------

    def exhaustive(self, queries: list[Query], k: int = 10, batch_size: int | None = None,
                   quiet: bool = True, rank_by: str | None = None) -> list[QueryResult]:
        """Every stored row recomputed from its token ids and scored: the ground truth."""
        rank_by = _check_rank_by(rank_by)
        clock = _Clock()
        pre = self.preconditioned(queries)
        self_q = self_influence(pre).cpu().numpy()
        batch_size = batch_size or self.runtime.manifest.settings.batch_size
        parts = []
        with progress_bar("exhaustive", self.rows, quiet) as advance:
            for shard_id, reader in self.shards.items():
                for start in range(0, reader.rows, batch_size):
                    rows = np.arange(start, min(start + batch_size, reader.rows))
                    token_ids = [m["token_ids"] for m in reader.metadata(rows)]
                    train = self.runtime.encoder().preconditioned(token_ids)
                    per_module = per_module_scores(pre, train)
                    module_scores = torch.stack([per_module[n] for n in self.modules], dim=-1)  # (Q, B, M)
                    parts.append((np.full(len(rows), shard_id), rows, module_scores.double().cpu().numpy(),
                                  self_influence(train).double().cpu().numpy()))
                    advance(len(rows))
        clock.lap("score")
        shards = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
        module_scores = np.concatenate([p[2] for p in parts], axis=1)
        self_m = np.concatenate([p[3] for p in parts])
        results = []
        for i, query in enumerate(queries):
            scored = _Scored(shards, rows, module_scores[i].sum(1), module_scores[i], self_m)
            hits, worst = self._ends(scored, self_q[i], k, rank_by, opponents=True)
            results.append(QueryResult(query.prompt, query.completion, "exhaustive", hits, worst,
                                       float(self_q[i]), len(rows), {}))
        clock.lap("metadata")
        for result in results:
            result.timings_ms = {name: value / len(results) for name, value in clock.total().items()}
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
                         np.zeros((len(self_m), len(self.modules))), self_m)
        hits = self._hits(scored, np.argsort(-self_m, kind="stable")[:top], 0.0)
        for hit in hits:
            hit.module_scores = {}
        return hits
