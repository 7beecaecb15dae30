"""The query engine: query row → FAISS candidates → rescoring from the stored rows.

Three modes answer the same question at different costs:

- *index*: the query's gradient is projected into a row (attribdb/rows.py)
  whose inner products with training rows are their compressed scores; FAISS
  finds ``candidates`` rows per query by inner product with it (for the top
  and, negated, for the opponents), and the candidates' stored rows give their
  compressed scores per module.
- *exact*: the index answer, then the top rows' full gradients recomputed
  from their stored token ids: the EK-FAC score with no compression, split
  into per-token contributions.
- *exhaustive*: every row recomputed on the fly (what kronfluence does per
  query batch): the ground truth for tests and benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from attribdb import layout
from attribdb.errors import QueryError
from attribdb.faiss_index import divide_by_norm, search
from attribdb.influence import per_module_scores, self_influence, token_contributions
from attribdb.inspection import existing_shards
from attribdb.progress import progress_bar
from attribdb.rows import module_scores
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader
from attribdb.tasks import collate_sequences
from query.results import Hit, QueryResult

DEFAULT_CANDIDATES = 128  # per end, whatever k is (up to k itself), so a query's top k never depends on k


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

    def query_rows(self, queries: list[Query]) -> torch.Tensor:
        """(Q, dim) rows of the queries' measurement gradients: what training rows are matched with."""
        captures, _ = self.runtime.runner.measurement_captures(self._query_batch(queries))
        return self.runtime.projection.encode_query(captures, self._inverse_hvp)

    def _inverse_hvp(self, captures) -> dict[str, torch.Tensor]:
        return self.runtime.computer.rotated_inverse_hvp(captures)

    # ---- index mode ------------------------------------------------------

    def query(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              opponents: bool = True, rank_by: str | None = None) -> list[QueryResult]:
        """The best ``k`` of ``max(candidates, k)`` FAISS candidates per end, ordered by ``rank_by``.
        With a flat index the candidates are the best rows by the stored rows' own inner product,
        so the top k of a query are the first k of any larger k."""
        if not queries:
            return []
        if k <= 0 or candidates <= 0:
            raise QueryError(f"k and candidates must be positive, got k={k}, candidates={candidates}")
        rank_by = _check_rank_by(rank_by)
        clock = _Clock()
        query_rows = self.query_rows(queries).float()
        self_q = query_rows.double().pow(2).sum(1).cpu().numpy()
        clock.lap("gradient")
        top, bottom = self._candidates(query_rows.cpu().numpy(), max(candidates, k), opponents)
        clock.lap("search")
        results = []
        for i, query in enumerate(queries):
            scored = self._rescore(query_rows[i:i + 1], top[i] + bottom[i])
            clock.lap("rescore")
            hits, worst = self._ends(scored, self_q[i], k, rank_by, opponents)
            clock.lap("metadata")
            results.append(QueryResult(query.prompt, query.completion, "index", hits, worst, float(self_q[i]),
                                       len(scored.rows), {}))
        for result in results:
            result.timings_ms = {name: value / len(results) for name, value in clock.total().items()}
        return results

    def _candidates(self, query_rows: np.ndarray, candidates: int, opponents: bool) -> tuple[list, list]:
        """Per query, the best ``candidates`` (FAISS score, shard, row) over every shard, and with
        ``opponents`` the most negative ones too: both ends come from one scan of each index."""
        n = len(query_rows)
        both = np.concatenate([query_rows, -query_rows]) if opponents else query_rows
        merged = [[] for _ in range(len(both))]
        for shard_id, index in self.indexes.items():
            scores, ids = search(index, both, candidates)
            for i in range(len(both)):
                merged[i] += [(float(s), shard_id, int(r)) for s, r in zip(scores[i], ids[i]) if r >= 0]
        best = [sorted(found, reverse=True)[:candidates] for found in merged]
        return best[:n], (best[n:] if opponents else [[] for _ in range(n)])

    def _rescore(self, query_row: torch.Tensor, candidates: list[tuple[float, int, int]]) -> _Scored:
        """Compressed scores, per module, of candidate rows from their stored rows."""
        pairs = sorted({(shard_id, row) for _, shard_id, row in candidates})
        shards = np.array([p[0] for p in pairs], dtype=np.int64)
        rows = np.array([p[1] for p in pairs], dtype=np.int64)
        if not pairs:
            return _Scored(shards, rows, np.zeros(0), np.zeros((0, len(self.modules))), np.zeros(0))
        stored, self_m = [], []
        for reader, wanted in self._by_shard(shards, rows):
            stored.append(reader.read(layout.ROWS, wanted))
            self_m.append(reader.whole(layout.SELF_INFLUENCE)[wanted])
        self_m = np.concatenate(self_m)
        device = query_row.device
        per_module = module_scores(self.runtime.row_layout, query_row,
                                   torch.from_numpy(np.concatenate(stored)).to(device),
                                   torch.from_numpy(self_m).to(device))[0].double().cpu().numpy()
        return _Scored(shards, rows, per_module.sum(1), per_module, self_m.astype(np.float64))

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
        their stored rows are recomputed in full from their tokens, re-ranked by their exact
        (normalized) score, and split into per-token contributions."""
        refine = max(k, refine or 3 * k)
        rank_by = _check_rank_by(rank_by)
        results = self.query(queries, k=refine, candidates=max(candidates, refine), rank_by=rank_by)
        computer = self.runtime.computer
        for query, result in zip(queries, results):
            started = time.perf_counter()
            query_pre = computer.query_preconditioned(self._query_batch([query]))
            inverse_hvp = {name: r[0] for name, r in computer.inverse_hvp(query_pre).items()}
            self._recompute(result.hits + result.opponents, inverse_hvp, float(self_influence(query_pre)[0]))
            key = (lambda h: h.exact_score) if rank_by == "score" else (lambda h: h.exact_normalized_score)
            result.hits = sorted(result.hits, key=key, reverse=True)[:k]
            result.opponents = [h for h in sorted(result.opponents, key=key) if h.exact_score < 0][:k]
            for hits in (result.hits, result.opponents):
                for rank, hit in enumerate(hits, start=1):
                    hit.rank = rank
            result.mode = "exact"
            result.timings_ms["exact"] = 1000 * (time.perf_counter() - started)
            result.timings_ms["total"] += result.timings_ms["exact"]
        return results

    def _recompute(self, hits: list[Hit], inverse_hvp: dict[str, torch.Tensor], query_self: float) -> None:
        if not hits:
            return
        metas = [self.shards[h.shard].metadata([h.row])[0] for h in hits]
        token_ids = [m["token_ids"] for m in metas]
        batch = collate_sequences(token_ids, self.runtime.tokenizer.pad_token_id)
        computer = self.runtime.computer
        captures, _ = computer.runner.train_captures(batch)
        contributions = token_contributions(inverse_hvp, captures).double().cpu()
        self_m = self_influence(computer.precondition(captures)).double().cpu().numpy()
        for hit, ids, row, row_self in zip(hits, token_ids, contributions, self_m):
            hit.tokens = [self.runtime.tokenizer.decode([t]) for t in ids]
            hit.token_contributions = row[:len(ids)].tolist()
            hit.exact_score = float(row.sum())
            hit.exact_normalized_score = float(normalized(hit.exact_score, query_self, row_self))

    # ---- exhaustive mode ---------------------------------------------------

    def exhaustive(self, queries: list[Query], k: int = 10, batch_size: int | None = None,
                   quiet: bool = True, rank_by: str | None = None) -> list[QueryResult]:
        """Every stored row recomputed from its token ids and scored in full: the ground truth."""
        rank_by = _check_rank_by(rank_by)
        clock = _Clock()
        computer = self.runtime.computer
        pad_id = self.runtime.tokenizer.pad_token_id
        query_pre = computer.query_preconditioned(self._query_batch(queries))
        self_q = self_influence(query_pre).cpu().numpy()
        batch_size = batch_size or self.runtime.manifest.settings.batch_size
        parts = []
        with progress_bar("exhaustive", self.rows, quiet) as advance:
            for shard_id, reader in self.shards.items():
                for start in range(0, reader.rows, batch_size):
                    rows = np.arange(start, min(start + batch_size, reader.rows))
                    token_ids = [m["token_ids"] for m in reader.metadata(rows)]
                    train = computer.train_preconditioned(collate_sequences(token_ids, pad_id))
                    per_module = per_module_scores(query_pre, train)
                    stacked = torch.stack([per_module[n] for n in self.modules], dim=-1)  # (Q, B, M)
                    parts.append((np.full(len(rows), shard_id), rows, stacked.double().cpu().numpy(),
                                  self_influence(train).double().cpu().numpy()))
                    advance(len(rows))
        clock.lap("score")
        shards = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
        per_row = np.concatenate([p[2] for p in parts], axis=1)
        self_m = np.concatenate([p[3] for p in parts])
        results = []
        for i, query in enumerate(queries):
            scored = _Scored(shards, rows, per_row[i].sum(1), per_row[i], self_m)
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
