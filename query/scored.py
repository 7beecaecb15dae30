"""A query's scored rows, and how they rank into its two ends (the top and the opponents).

Every mode ends here: index and exact modes with the stored-row scores of
their candidates (the best of them recomputed), the exhaustive pass with every
row's exact scores, the prefilter with its BM25 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attribdb.faiss_index import divide_by_norm
from attribdb.query.results import Hit
from attribdb.records import RowRecord


def normalized(scores, self_q: float, self_m):
    """score / sqrt(self-influence of query × of row): the cosine of the two preconditioned
    gradients.  Raw scores favour rows with large gradients; this ranks by direction alone.
    It is the default because it did better on both demo evaluations: it found the documents
    stating a fact more often, and removing its top documents cost the
    retrained model more of the fact, which is influence itself (docs/evidence.md)."""
    return divide_by_norm(scores, self_q * np.asarray(self_m, dtype=np.float64))


@dataclass
class ScoredRows:
    """Scores of rows for one query: parallel arrays, and the query's own self-influence (its
    row's, and once recomputation computed it, its exact one).  Rows recomputed in full have
    ``exact`` set, and come first in both ends.

    Over a trajectory (:meth:`combine`) the rows are scored at each checkpoint (``parts``) and
    their scores, per-module scores and self-influences are the weighted sums of the parts'; the
    normalized key is the weighted sum of the checkpoints' cosines, as the evaluations that found
    the trajectory's gain summed them (docs/evidence.md): each checkpoint's scale (gradient norms,
    damping) would otherwise weigh the sum."""

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
    chosen: dict = field(default_factory=dict)  # end ("top" | "bottom") -> (N,) bool: to recompute for it
    parts: list | None = None  # over a trajectory: the same rows scored at each checkpoint
    weights: tuple[float, ...] = ()  # of the parts in the sum
    names: tuple[str, ...] = ()  # of the parts' checkpoints

    def __post_init__(self):
        n = len(self.rows)
        if self.exact is None:
            self.exact = np.zeros(n, dtype=bool)
            self.exact_scores, self.exact_self_influence = np.zeros(n), np.zeros(n)
            self.exact_module_scores = np.zeros_like(self.module_scores)

    @classmethod
    def combine(cls, parts: list["ScoredRows"], weights: tuple[float, ...], names: tuple[str, ...]) -> "ScoredRows":
        """The same rows, in the same order, scored at each checkpoint (``parts``), scored over the
        trajectory: weighted sums, and the parts kept for the cosine key and each hit's breakdown."""
        def total(name: str):
            return sum(w * getattr(p, name) for w, p in zip(weights, parts))

        first = parts[0]
        assert all(np.array_equal(p.rows, first.rows) and np.array_equal(p.exact, first.exact) for p in parts), \
            "a trajectory's parts score the same rows and recompute the same ones"
        return cls(first.shards, first.rows, total("scores"), total("module_scores"), total("self_influence"),
                   float(total("query_self")), float(total("exact_query_self")), first.exact, total("exact_scores"),
                   total("exact_module_scores"), total("exact_self_influence"), first.chosen, parts, weights, names)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.shards.tolist(), self.rows.tolist()))

    @property
    def reported_query_self(self) -> float:
        """The query's self-influence a result reports: exact once recomputation computed it."""
        return self.exact_query_self or self.query_self

    def key(self, rank_by: str) -> np.ndarray:
        """The compressed ranking key of every row."""
        if rank_by == "score":
            return self.scores
        if self.parts:
            return sum(w * p.key(rank_by) for w, p in zip(self.weights, self.parts))
        return normalized(self.scores, self.query_self, self.self_influence)

    def exact_key(self, rank_by: str) -> np.ndarray:
        """The exact ranking key (meaningful where ``exact``)."""
        if rank_by == "score":
            return self.exact_scores
        if self.parts:
            return sum(w * p.exact_key(rank_by) for w, p in zip(self.weights, self.parts))
        return normalized(self.exact_scores, self.exact_query_self, self.exact_self_influence)

    def _breakdowns(self, order: np.ndarray) -> list[dict[str, dict[str, float]] | None]:
        """For the rows at ``order``, each one's score and normalized score at each checkpoint of a
        trajectory (exact where recomputed), unweighted; None for a single model's rows."""
        if not self.parts:
            return [None] * len(order)
        columns = [(name, np.where(self.exact, p.exact_scores, p.scores),
                    np.where(self.exact, p.exact_key("normalized"), p.key("normalized")))
                   for name, p in zip(self.names, self.parts)]
        return [{name: {"score": float(scores[i]), "normalized_score": float(normal[i])}
                 for name, scores, normal in columns} for i in order]

    def ends(self, k: int, rank_by: str, opponents: bool) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the top ``k`` rows and, with ``opponents``, of the ``k`` most negative ones.
        Each end ranks first the rows recomputed for it, by their exact key, then the others by
        their compressed one.  A row recomputed for the other end joins the first group only if its
        exact key beats one of this end's recomputed rows (a bottom candidate whose exact score is
        high belongs at the top); otherwise it ranks among the rest, where a handful of recomputed
        opponents would otherwise push the top's stored rows out of it."""
        key, exact_key = self.key(rank_by), self.exact_key(rank_by)
        top = self._end(key, exact_key, self.chosen.get("top"), 1)[:k]
        if not opponents:
            return top, np.zeros(0, dtype=np.int64)
        worst = self._end(key, exact_key, self.chosen.get("bottom"), -1)[:k]
        final = np.where(self.exact, self.exact_scores, self.scores)
        return top, worst[final[worst] < 0]

    def _end(self, key: np.ndarray, exact_key: np.ndarray, chosen, sign: int) -> np.ndarray:
        """Every row in one end's order (``sign`` 1: best first; -1: most negative first)."""
        own = self.exact & (chosen if chosen is not None else self.exact)
        threshold = (sign * exact_key[own]).min() if own.any() else np.inf
        first = own | (self.exact & (sign * exact_key >= threshold))
        return np.lexsort((-sign * np.where(first, exact_key, key), ~first))

    def reachable(self, k: int, rankings: tuple[str, ...]) -> np.ndarray:
        """Indices, in order, of the rows that can still be among the ``k`` best or ``k`` worst under
        any of ``rankings`` once more rows come: what an exhaustive pass keeps per query instead of
        every row's scores.  A row in the top k of all rows is in the top k of any rows that include
        it, ties broken by their order as over all rows (no row is recomputed: the orders of :meth:`ends`)."""
        if len(self.rows) <= 2 * k * len(rankings):
            return np.arange(len(self.rows))
        keep = set()
        for ranking in rankings:
            key = self.key(ranking)
            keep.update(np.argsort(-key, kind="stable")[:k].tolist())
            keep.update(np.argsort(key, kind="stable")[:k].tolist())
        return np.array(sorted(keep), dtype=np.int64)

    def hits(self, order: np.ndarray, records: list[RowRecord], modules: list[str]) -> list[Hit]:
        """Hits of the rows at ``order``, ranked 1, 2, ... in that order; ``records`` are theirs."""
        hits = []
        compressed, exact_keys = self.key("normalized"), self.exact_key("normalized")
        for rank, (i, record, breakdown) in enumerate(zip(order, records, self._breakdowns(order)), start=1):
            exact = bool(self.exact[i])
            module_values = self.exact_module_scores[i] if exact else self.module_scores[i]
            hits.append(Hit.from_record(
                record, int(self.shards[i]), int(self.rows[i]), rank=rank, score=float(self.scores[i]),
                normalized_score=float(compressed[i]), self_influence=float(self.self_influence[i]),
                module_scores={name: float(s) for name, s in zip(modules, module_values)},
                exact_score=float(self.exact_scores[i]) if exact else None,
                exact_normalized_score=float(exact_keys[i]) if exact else None,
                checkpoint_scores=breakdown))
        return hits
