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

import numpy as np
import torch

from attribdb import layout
from attribdb.compression import low_rank_scores
from attribdb.errors import QueryError
from attribdb.faiss_index import search
from attribdb.influence import Preconditioned, per_module_scores, self_influence, token_contributions
from attribdb.inspection import existing_shards
from attribdb.progress import progress_bar
from attribdb.runtime import Runtime
from attribdb.shard import ShardReader
from attribdb.tasks import collate_sequences
from query.results import Hit, QueryResult

DEFAULT_CANDIDATES = 256


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
              opponents: bool = True) -> list[QueryResult]:
        if not queries:
            return []
        if k <= 0 or candidates < k:
            raise QueryError(f"need 0 < k <= candidates, got k={k}, candidates={candidates}")
        clock = _Clock()
        pre = self.preconditioned(queries)
        sketches = self.runtime.sketcher.sketch(pre).cpu().numpy()
        self_q = self_influence(pre).cpu().numpy()
        clock.lap("gradient")
        top, bottom = self._candidates(sketches, candidates, opponents)
        clock.lap("search")
        results = []
        for i, query in enumerate(queries):
            scored = self._rescore({name: g[i:i + 1] for name, g in pre.items()}, top[i] + bottom[i])
            clock.lap("rescore")
            hits = self._hits(scored, np.argsort(-scored.scores, kind="stable")[:k], self_q[i])
            worst = self._hits(scored, np.argsort(scored.scores, kind="stable")[:k], self_q[i]) if opponents else []
            worst = [h for h in worst if h.score < 0]
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
        """Exact scores of candidate rows against their stored low-rank factors: rows are read
        shard by shard, then scored together, one GEMM per module."""
        by_shard: dict[int, set[int]] = {}
        for _, shard_id, row in candidates:
            by_shard.setdefault(shard_id, set()).add(row)
        shards, rows, packed, sigma, self_m = [], [], [], [], []
        for shard_id, row_set in sorted(by_shard.items()):
            reader = self.shards[shard_id]
            wanted = np.array(sorted(row_set), dtype=np.int64)
            packed.append(reader.read(layout.LOWRANK, wanted))
            sigma.append(reader.whole(layout.SIGMA)[wanted])
            self_m.append(reader.whole(layout.SELF_INFLUENCE)[wanted])
            shards.append(np.full(len(wanted), shard_id))
            rows.append(wanted)
        if not rows:
            return _Scored(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float64)),
                           np.zeros((0, len(self.modules))), np.zeros(0))
        packed_rows = torch.from_numpy(np.concatenate(packed)).float()  # one conversion, not per module
        sigmas = torch.from_numpy(np.concatenate(sigma))
        columns = []
        for j, name in enumerate(self.modules):
            u, v = self.runtime.row_layout.unpack(packed_rows, name)
            columns.append(low_rank_scores(pre[name], u, v, sigmas[:, j])[0])
        module_scores = torch.stack(columns, dim=1).double().cpu().numpy()
        return _Scored(np.concatenate(shards), np.concatenate(rows), module_scores.sum(1), module_scores,
                       np.concatenate(self_m))

    def _hits(self, scored: _Scored, order: np.ndarray, self_q: float) -> list[Hit]:
        hits = []
        for rank, i in enumerate(order, start=1):
            shard_id, row = int(scored.shards[i]), int(scored.rows[i])
            meta = self.shards[shard_id].metadata([row])[0]
            self_m = float(scored.self_influence[i])
            denominator = float(np.sqrt(max(self_q * self_m, 0.0)))
            hits.append(Hit(
                rank=rank, score=float(scored.scores[i]),
                normalized_score=float(scored.scores[i]) / denominator if denominator > 0 else 0.0,
                self_influence=self_m,
                module_scores={name: float(s) for name, s in zip(self.modules, scored.module_scores[i])},
                doc_id=meta["doc_id"], source=meta["source"], token_span=meta["token_span"],
                char_span=meta.get("char_span", [0, len(meta["text"])]), text=meta["text"],
                shard=shard_id, row=row))
        return hits

    # ---- exact mode ------------------------------------------------------

    def exact(self, queries: list[Query], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
              refine: int | None = None) -> list[QueryResult]:
        """Index answers refined without compression: the best ``refine`` rows (default 3k) by
        low-rank score are recomputed in full from their tokens, re-ranked by their exact
        score, and split into per-token contributions."""
        refine = max(k, refine or 3 * k)
        results = self.query(queries, k=refine, candidates=max(candidates, refine))
        computer = self.runtime.computer
        for query, result in zip(queries, results):
            started = time.perf_counter()
            inverse_hvp = {name: r[0] for name, r in computer.query_inverse_hvp(self._query_batch([query])).items()}
            self._recompute(result.hits + result.opponents, inverse_hvp)
            result.hits = sorted(result.hits, key=lambda h: -h.exact_score)[:k]
            result.opponents = [h for h in sorted(result.opponents, key=lambda h: h.exact_score) if h.exact_score < 0][:k]
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
                   quiet: bool = True) -> list[QueryResult]:
        """Every stored row recomputed from its token ids and scored: the ground truth."""
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
            hits = self._hits(scored, np.argsort(-scored.scores, kind="stable")[:k], self_q[i])
            worst = [h for h in self._hits(scored, np.argsort(scored.scores, kind="stable")[:k], self_q[i])
                     if h.score < 0]
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
