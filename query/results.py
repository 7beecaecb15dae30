"""Result objects: plain dataclasses that also become JSON and pandas."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from attribdb.records import RowRecord


@dataclass
class Hit:
    """One training sequence and its influence on a query."""

    rank: int
    score: float  # g_qᵀ (F + λ)⁻¹ g_m: > 0 means training on it made the completion likelier (text mode: BM25)
    normalized_score: float | None  # score / sqrt(self_q · self_m); None in text mode, which has no influence
    self_influence: float  # of the row as stored (index, exact, prefilter, text) or uncompressed (exhaustive)
    module_scores: dict[str, float]
    doc_id: str
    source: str
    token_span: list[int]
    char_span: list[int]
    text: str
    shard: int
    row: int
    exact_score: float | None = None  # recomputed with no compression (rescored rows)
    exact_normalized_score: float | None = None  # exact_score / sqrt(self_q · self_m), both uncompressed
    tokens: list[str] | None = None  # the sequence's tokens (exact mode)
    token_contributions: list[float] | None = None  # per-token split of exact_score
    bm25: float | None = None  # the row's BM25 score for the query's text (text mode and the BM25 prefilter)
    fused: float | None = None  # the hybrid prefilter's reciprocal-rank fusion score, which ranked the hit
    checkpoint_scores: dict[str, dict[str, float]] | None = None  # a trajectory database's: per checkpoint, its
    #   unweighted score and normalized score (exact where the row was recomputed); score, normalized_score and
    #   module_scores are then their weighted sums over the checkpoints

    @property
    def final_score(self) -> float:
        """The score the hit was ranked by: exact where its row was recomputed, else compressed."""
        return self.score if self.exact_score is None else self.exact_score

    @property
    def final_normalized_score(self) -> float | None:
        return self.normalized_score if self.exact_normalized_score is None else self.exact_normalized_score

    @classmethod
    def from_record(cls, record: RowRecord, shard: int, row: int, **scores) -> "Hit":
        """A hit for a row's LMDB record, with the scores a mode gives it."""
        return cls(doc_id=record.doc_id, source=record.source, token_span=list(record.token_span),
                   char_span=list(record.char_span), text=record.text, shard=shard, row=row, **scores)


@dataclass
class QueryResult:
    prompt: str
    completion: str
    mode: str  # index | exact | exhaustive | text | prefilter | hybrid | score
    hits: list[Hit]
    opponents: list[Hit]  # most negative: training on them made the completion less likely
    query_self_influence: float
    candidates: int  # rows scored from the row store (index, exact, prefilter), recomputed (exhaustive),
    #                  or holding a query term (text)
    timings_ms: dict[str, float] = field(default_factory=dict)
    rescored: int = 0  # candidates recomputed in full, whose exact scores rank them (index, exact, prefilter)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_pandas(self):
        """One row per hit and opponent, with a ``kind`` column."""
        import pandas as pd

        rows = [{"kind": "hit", **asdict(h)} for h in self.hits]
        rows += [{"kind": "opponent", **asdict(h)} for h in self.opponents]
        return pd.DataFrame(rows)
