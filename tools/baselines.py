"""Attribution baselines for the evaluations: BM25 text retrieval, representation similarity, gradient cosine."""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over documents (k1 = 1.5, b = 0.75)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.docs = [Counter(words(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.average = sum(self.lengths) / len(self.lengths)
        frequency = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        terms = words(query)
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.average)
            out.append(sum(self.idf.get(t, 0.0) * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in terms if t in doc))
        return out


def mean_hidden_states(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over tokens of the last hidden layer, L2-normalised: the representation-similarity baseline."""
    from attribdb.tasks import collate_sequences

    vectors = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t)["input_ids"][:max_length] or [tokenizer.eos_token_id] for t in texts[start:start + batch_size]]
        batch = collate_sequences(ids, tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(vectors)


def rank_documents(row_scores: list[tuple[str, float]]) -> list[str]:
    """Distinct document ids by their best-scoring row, best first."""
    best: dict[str, float] = {}
    for doc_id, score in row_scores:
        if doc_id not in best or score > best[doc_id]:
            best[doc_id] = score
    return sorted(best, key=lambda d: -best[d])


def attribdb_rankings(db, facts, k: int, rank_by: str) -> list[list[str]]:
    """Per fact, documents by their best row among attribdb's top k, under ``rank_by``."""
    field = "final_score" if rank_by == "score" else "final_normalized_score"  # exact where rescored
    results = db.query_batch([(f.prompt, f.completion) for f in facts], k=k, rank_by=rank_by)
    return [rank_documents([(h.doc_id, getattr(h, field)) for h in r.hits]) for r in results]


def mrr_and_recall(ranking: list[str], relevant: set[str], k: int = 10) -> tuple[float, float]:
    first = next((i for i, d in enumerate(ranking, start=1) if d in relevant), None)
    return (1 / first if first else 0.0), len(relevant & set(ranking[:k])) / len(relevant)
