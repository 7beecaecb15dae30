"""Every attribution method the evaluations compare, as one ranking of documents per fact.

tools/evaluations/eval_facts.py scores the rankings against the documents that state each fact;
tools/evaluations/eval_counterfactual.py removes their top documents and retrains.  Both call ``method_rankings``
so that the two evaluations judge exactly the same lists.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import torch

from attribdb.query.text import reciprocal_rank_fusion

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
        ids = [tokenizer(t)["input_ids"][:max_length] or [tokenizer.eos_token_id]
               for t in texts[start:start + batch_size]]
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


def attribdb_rankings(db, facts, k: int, rank_by: str, mode: str = "index") -> list[list[str]]:
    """Per fact, documents by their best row among attribdb's top k in ``mode`` (index, exact, or
    the BM25 prefilter of the top k rows: ``prefilter``), under ``rank_by`` (``hybrid``: prefilter only)."""
    queries = [(f.prompt, f.completion) for f in facts]
    if mode == "prefilter":
        results = db.prefilter_batch(queries, n=k, k=k, rank_by=rank_by)
    else:
        results = (db.exact_batch if mode == "exact" else db.query_batch)(queries, k=k, rank_by=rank_by)
    field = {"score": "final_score", "hybrid": "fused"}.get(rank_by, "final_normalized_score")  # exact where rescored
    return [rank_documents([(h.doc_id, getattr(h, field)) for h in r.hits]) for r in results]


BM25_FILTER = 100  # documents the "BM25 top N + influence" method scores
HYBRID = f"hybrid: RRF of BM25 and influence, top {BM25_FILTER}"  # query.text's fusion, as --rank-by hybrid ranks


def bm25_rankings(bm25: BM25, doc_ids: list[str], texts: list[str]) -> list[list[str]]:
    out = []
    for text in texts:
        scores = bm25.scores(text)
        out.append([doc_ids[i] for i in sorted(range(len(doc_ids)), key=lambda i: -scores[i])])
    return out


def bm25_filtered(bm25: list[list[str]], influence: list[list[str]]) -> list[list[str]]:
    """The influence order of the BM25 top ``BM25_FILTER`` documents (the paper's TF-IDF filter)."""
    return [[d for d in ranked if d in allowed]
            for ranked, allowed in zip(influence, (set(t[:BM25_FILTER]) for t in bm25))]


def hybrid(bm25: list[list[str]], influence: list[list[str]]) -> list[list[str]]:
    """The BM25 top N fused with their influence order (--prefilter bm25:N --rank-by hybrid, per document)."""
    return [[d for d, _ in reciprocal_rank_fusion([text[:BM25_FILTER], filtered])]
            for text, filtered in zip(bm25, bm25_filtered(bm25, influence))]


CHECKPOINTS = "checkpoint influence"
CHECKPOINT_HYBRID = f"hybrid: RRF of BM25 and checkpoint influence, top {BM25_FILTER}"
TRAJECTORY = "attribdb trajectory (one database, index)"
TRAJECTORY_EXHAUSTIVE = "attribdb trajectory (one database, exhaustive)"
TRAJECTORY_HYBRID = f"hybrid: RRF of BM25 and attribdb trajectory, top {BM25_FILTER}"
TRAJECTORY_LR = "attribdb trajectory, lr-weighted (one database, index)"
TRAJECTORY_LR_HYBRID = f"hybrid: RRF of BM25 and lr-weighted attribdb trajectory, top {BM25_FILTER}"


def row_cosines(results) -> list[dict[tuple[str, tuple[int, ...]], float]]:
    """Per query, every row's normalized (cosine) influence, keyed by document and token span:
    the key a row has in every database built over the same corpus at the same settings."""
    return [{(h.doc_id, tuple(h.token_span)): h.normalized_score for h in r.hits} for r in results]


def checkpoint_cosines(path: Path, queries) -> list[dict]:
    """row_cosines of the exhaustive EK-FAC pass over a checkpoint's database (factors fitted on
    that checkpoint's model)."""
    from attribdb import api

    with api.open(path) as db:
        return row_cosines(db.exhaustive(queries, k=db.engine.rows, quiet=True))


def rank_rows(cosines: list[dict]) -> list[list[str]]:
    return [rank_documents([(doc_id, score) for (doc_id, _), score in rows.items()]) for rows in cosines]


def identity_computer(runtime):
    from attribdb.factors import FactorConfig, Factors, ModuleFactors
    from attribdb.influence import InfluenceComputer

    modules = runtime.manifest.modules
    plain = Factors(FactorConfig("identity"), modules, {m.name: ModuleFactors(None, None, None, 0.0) for m in modules})
    return InfluenceComputer(runtime.model, runtime.task, plain)


def flat(pre: dict) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in pre.values()], dim=1)


def gradient_cosine_rows(engine, facts) -> list[list[tuple[str, float]]]:
    """Per fact, (doc id, cosine) of every stored row, from raw gradients recomputed on the fly."""
    from attribdb.tasks import collate_sequences

    runtime = engine.runtime
    computer = identity_computer(runtime)
    tokenizer = runtime.tokenizer
    query_ids = [(tokenizer(f.prompt)["input_ids"], tokenizer(f.completion)["input_ids"]) for f in facts]
    batch = collate_sequences([p + c for p, c in query_ids], tokenizer.pad_token_id, [len(p) for p, _ in query_ids])
    queries = torch.nn.functional.normalize(flat(computer.query_preconditioned(batch)), dim=1)
    rows: list[list[tuple[str, float]]] = [[] for _ in facts]
    for reader in engine.store.shards.values():
        for start in range(0, reader.rows, 16):
            metas = reader.metadata(range(start, min(start + 16, reader.rows)))
            train = collate_sequences([m.token_ids for m in metas], tokenizer.pad_token_id)
            cosines = queries @ torch.nn.functional.normalize(flat(computer.train_preconditioned(train)), dim=1).T
            for i in range(len(facts)):
                rows[i] += [(m.doc_id, float(c)) for m, c in zip(metas, cosines[i])]
    return rows


def method_rankings(db, docs: list[dict], facts, index_k: int = 200, timings: dict[str, float] | None = None,
                    checkpoint_dbs: list[Path] = (), trajectory_dbs: dict[str, Path] | None = None,
                    ) -> dict[str, list[list[str]]]:
    """Per method, per fact, document ids best first.

    attribdb through its index (the default cosine ranking and ``--rank-by score``, ``index_k``
    deep), exhaustive EK-FAC influence under both rankings, influence restricted to the BM25 top
    ``BM25_FILTER`` documents (the paper's TF-IDF filter: exact influence on the filtered set is the
    exhaustive score restricted to it, so it is read off the exhaustive pass), BM25 on prompt +
    completion and on the prompt alone, gradient cosine and representation similarity.

    With ``checkpoint_dbs`` (databases of earlier checkpoints of ``db``'s model, oldest first), also
    checkpoint influence: per row, the exhaustive cosine summed over those checkpoints and the final
    model (TracIn-style, EK-FAC-preconditioned at each checkpoint as in Bae et al. 2024, SOURCE),
    each checkpoint alone, and the sum's hybrid with BM25.  Why: at the final checkpoint the model
    has memorised documents repeated many times, which leaves them almost no gradient; earlier it had
    not, so their gradients can still align with the query's.  Cosines, not scores: each
    checkpoint's scale (gradient norms, damping) would otherwise weigh the sum.

    With ``trajectory_dbs`` (one attribdb database of the same checkpoints and the final model per
    weighting, ``uniform`` and ``lr``), the same sum as attribdb answers it: its default index query
    (``index_k`` deep), the uniform one's exhaustive pass (which ranks as checkpoint influence does,
    from one database), and each index answer's hybrid with BM25.
    """
    timings = {} if timings is None else timings
    doc_ids = [d["id"] for d in docs]
    out: dict[str, list[list[str]]] = {}

    def timed(method: str, compute) -> None:
        started = time.time()
        out[method] = compute()
        timings[method] = time.time() - started

    queries = [(f.prompt, f.completion) for f in facts]
    timed("attribdb index", lambda: attribdb_rankings(db, facts, index_k, "normalized"))
    timed("attribdb index, by score", lambda: attribdb_rankings(db, facts, index_k, "score"))
    started = time.time()
    every_row = db.exhaustive(queries, k=db.engine.rows)
    out["attribdb exhaustive"] = [rank_documents([(h.doc_id, h.normalized_score) for h in r.hits]) for r in every_row]
    out["attribdb exhaustive, by score"] = [rank_documents([(h.doc_id, h.score) for h in r.hits]) for r in every_row]
    timings["attribdb exhaustive"] = timings["attribdb exhaustive, by score"] = time.time() - started
    bm25 = BM25([d["text"] for d in docs])
    timed("BM25", lambda: bm25_rankings(bm25, doc_ids, [f.prompt + f.completion for f in facts]))
    timed("BM25, prompt only", lambda: bm25_rankings(bm25, doc_ids, [f.prompt for f in facts]))
    out[f"BM25 top {BM25_FILTER} + influence"] = bm25_filtered(out["BM25"], out["attribdb exhaustive"])
    timings[f"BM25 top {BM25_FILTER} + influence"] = timings["BM25"] + timings["attribdb exhaustive"]
    out[HYBRID] = hybrid(out["BM25"], out["attribdb exhaustive"])
    timings[HYBRID] = timings[f"BM25 top {BM25_FILTER} + influence"]
    if checkpoint_dbs:
        per_step = []
        for path in checkpoint_dbs:
            started = time.time()
            per_step.append(checkpoint_cosines(path, queries))
            alone = f"{CHECKPOINTS}, step {path.name.rsplit('-', 1)[-1]} only"
            out[alone] = rank_rows(per_step[-1])
            timings[alone] = time.time() - started
        timings[CHECKPOINTS] = sum(timings[m] for m in out if m.startswith(f"{CHECKPOINTS},")) \
            + timings["attribdb exhaustive"]
        per_step.append(row_cosines(every_row))
        out[CHECKPOINTS] = rank_rows([{row: sum(step[i][row] for step in per_step) for row in final}
                                      for i, final in enumerate(per_step[-1])])
        out[CHECKPOINT_HYBRID] = hybrid(out["BM25"], out[CHECKPOINTS])
        timings[CHECKPOINT_HYBRID] = timings[CHECKPOINTS] + timings["BM25"]
    if trajectory_dbs:
        from attribdb import api

        timed(TRAJECTORY_EXHAUSTIVE, lambda: rank_rows(checkpoint_cosines(trajectory_dbs["uniform"], queries)))
        for weights, method, fused in (("uniform", TRAJECTORY, TRAJECTORY_HYBRID),
                                       ("lr", TRAJECTORY_LR, TRAJECTORY_LR_HYBRID)):
            with api.open(trajectory_dbs[weights]) as trajectory:
                timed(method, lambda: attribdb_rankings(trajectory, facts, index_k, "normalized"))
            out[fused] = hybrid(out["BM25"], out[method])
            timings[fused] = timings[method] + timings["BM25"]

    def representation() -> list[list[str]]:
        runtime = db.engine.runtime
        max_length = runtime.manifest.settings.max_length
        doc_vectors = mean_hidden_states(runtime.model, runtime.tokenizer, [d["text"] for d in docs], max_length)
        query_vectors = mean_hidden_states(runtime.model, runtime.tokenizer, [p + c for p, c in queries], max_length)
        return [[doc_ids[i] for i in torch.argsort(-row).tolist()] for row in query_vectors @ doc_vectors.T]

    timed("representation similarity", representation)
    timed("gradient cosine", lambda: [rank_documents(rows) for rows in gradient_cosine_rows(db.engine, facts)])
    return out


def mrr_and_recall(ranking: list[str], relevant: set[str], k: int = 10) -> tuple[float, float]:
    first = next((i for i, d in enumerate(ranking, start=1) if d in relevant), None)
    return (1 / first if first else 0.0), len(relevant & set(ranking[:k])) / len(relevant)
