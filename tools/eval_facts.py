"""Fact tracing: does attribution find the documents that state a queried fact?

On the demo corpus (invented facts, each stated by several paraphrases; the
queries use a phrasing no document uses), for every fact: rank the training
documents by each method and report MRR (of the first document that states
the fact) and recall@10 (of all of them), over all facts and separately over
those the model completes correctly and those it does not, for

- attribdb (EK-FAC influence through the index), ranked by its normalised
  (cosine) form, the default, and by the score itself,
- BM25 over the documents (text retrieval on prompt + completion),
- representation similarity (cosine of the model's mean last hidden state),
- gradient cosine (cosine of the raw, unpreconditioned gradients).

Run: python tools/eval_facts.py [--workdir attribdb-demo]   (reuses the demo's model and database)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BM25, attribdb_rankings, mean_hidden_states, mrr_and_recall, rank_documents  # noqa: E402
from benchutil import recall  # noqa: E402


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
    for reader in engine.shards.values():
        for start in range(0, reader.rows, 16):
            metas = reader.metadata(range(start, min(start + 16, reader.rows)))
            train = collate_sequences([m["token_ids"] for m in metas], tokenizer.pad_token_id)
            cosines = queries @ torch.nn.functional.normalize(flat(computer.train_preconditioned(train)), dim=1).T
            for i in range(len(facts)):
                rows[i] += [(m["doc_id"], float(c)) for m, c in zip(metas, cosines[i])]
    return rows


def index_recall(db, facts, k: int = 10) -> dict[str, float]:
    """Per ranking, the share of the exhaustive top-k rows that the index answer (default candidates) returns."""
    queries = [(f.prompt, f.completion) for f in facts]
    return {rank_by: recall(db.query_batch(queries, k=k, rank_by=rank_by),
                            db.exhaustive(queries, k=k, rank_by=rank_by), k)
            for rank_by in ("normalized", "score")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-demo"))
    args = parser.parse_args()

    from attribdb import api
    from attribdb.demo.run import FULL, prepare
    from attribdb.demo.train import known_facts

    prepared = prepare(args.workdir, FULL, "full")
    facts = prepared.facts
    docs = [json.loads(line) for line in prepared.corpus.read_text().splitlines()]
    doc_ids = [d["id"] for d in docs]
    rankings: dict[str, list[list[str]]] = {}
    timings: dict[str, float] = {}

    db = api.open(prepared.db_path)
    # the default query path first (k=10, default candidates), then deeper lists for MRR past rank 10
    for method, rank_by, k in (("attribdb default (k=10)", "normalized", 10),
                               ("attribdb (k=200)", "normalized", 200),
                               ("attribdb, --rank-by score (k=200)", "score", 200)):
        started = time.time()
        rankings[method] = attribdb_rankings(db, facts, k, rank_by)
        timings[method] = time.time() - started

    started = time.time()
    bm25 = BM25([d["text"] for d in docs])
    rankings["BM25 text retrieval"] = [
        [doc_ids[i] for i in sorted(range(len(docs)), key=lambda i, s=bm25.scores(f.prompt + f.completion): -s[i])]
        for f in facts]
    timings["BM25 text retrieval"] = time.time() - started

    started = time.time()
    runtime = db.engine.runtime
    max_length = runtime.manifest.settings.max_length
    doc_vectors = mean_hidden_states(runtime.model, runtime.tokenizer, [d["text"] for d in docs], max_length)
    query_vectors = mean_hidden_states(runtime.model, runtime.tokenizer, [f.prompt + f.completion for f in facts],
                                       max_length)
    similarity = query_vectors @ doc_vectors.T
    rankings["representation similarity"] = [[doc_ids[i] for i in torch.argsort(-row).tolist()] for row in similarity]
    timings["representation similarity"] = time.time() - started

    started = time.time()
    rankings["gradient cosine"] = [rank_documents(rows) for rows in gradient_cosine_rows(db.engine, facts)]
    timings["gradient cosine"] = time.time() - started

    fidelity = index_recall(db, facts)
    known = known_facts(prepared.model_dir, facts)
    subsets = {"all": [True] * len(facts), "known": known, "unknown": [not k for k in known]}
    print(f"{len(facts)} facts, {len(docs)} documents; the model completes {sum(known)} of the held-out prompts "
          f"(known), not the other {len(facts) - sum(known)} (unknown: influence then explains what it predicts "
          "instead, and the documents stating the fact need not be behind that)")
    print(f"{'method':<32}" + "".join(f" {f'MRR {n}':>12} {f'R@10 {n}':>13}" for n in subsets) + f" {'seconds':>8}")
    for method, ranked in rankings.items():
        line = f"{method:<32}"
        for chosen in subsets.values():
            pairs = [mrr_and_recall(r, set(f.doc_ids)) for r, f, keep in zip(ranked, facts, chosen) if keep]
            line += f" {sum(p[0] for p in pairs) / max(len(pairs), 1):>12.3f} {sum(p[1] for p in pairs) / max(len(pairs), 1):>13.3f}"
        print(line + f" {timings[method]:>8.1f}")
    print("index answers vs exhaustive on this trained model, recall@10 of rows: "
          + ", ".join(f"{rank_by} {recall:.3f}" for rank_by, recall in fidelity.items()))


if __name__ == "__main__":
    main()
