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
    ``exact`` set, and come first in both ends."""

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

    def __post_init__(self):
        n = len(self.rows)
        if self.exact is None:
            self.exact = np.zeros(n, dtype=bool)
            self.exact_scores, self.exact_self_influence = np.zeros(n), np.zeros(n)
            self.exact_module_scores = np.zeros_like(self.module_scores)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.shards.tolist(), self.rows.tolist()))

    @property
    def reported_query_self(self) -> float:
        """The query's self-influence a result reports: exact once recomputation computed it."""
        return self.exact_query_self or self.query_self

    def key(self, rank_by: str) -> np.ndarray:
        """The compressed ranking key of every row."""
        return self.scores if rank_by == "score" else normalized(self.scores, self.query_self, self.self_influence)

    def exact_key(self, rank_by: str) -> np.ndarray:
        """The exact ranking key (meaningful where ``exact``)."""
        if rank_by == "score":
            return self.exact_scores
        return normalized(self.exact_scores, self.exact_query_self, self.exact_self_influence)

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
        for rank, (i, record) in enumerate(zip(order, records), start=1):
            self_m = float(self.self_influence[i])
            exact = bool(self.exact[i])
            module_values = self.exact_module_scores[i] if exact else self.module_scores[i]
            hits.append(Hit.from_record(
                record, int(self.shards[i]), int(self.rows[i]), rank=rank, score=float(self.scores[i]),
                normalized_score=float(normalized(self.scores[i], self.query_self, self_m)),
                self_influence=self_m,
                module_scores={name: float(s) for name, s in zip(modules, module_values)},
                exact_score=float(self.exact_scores[i]) if exact else None,
                exact_normalized_score=float(normalized(self.exact_scores[i], self.exact_query_self,
                                                        self.exact_self_influence[i])) if exact else None))
        return hits
