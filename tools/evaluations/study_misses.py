"""Why does influence miss the documents that state a fact, where it does?  Numbers per suspected cause.

On a world and seed of tools/evaluations/worlds.py (the cached model and database), for every query the model
completes (known), every row is recomputed without compression (exact mode over all rows: EK-FAC
scores with per-token contributions), documents are ranked by their best row's cosine score, and
the stating documents are split into those in the top 10 and those missed.  For each group:

- memorisation: the percentile of the stating rows' self-influence among all rows (a fitted
  sequence has a small gradient, so a small self-influence), and the model's loss on the fact's
  value inside them;
- split windows: the share of stating documents whose statement no single row holds whole;
- where the score sits: the share of a stating row's score carried by the statement's own tokens
  and by common tokens (those in ≥ 20% of rows), and the common tokens' share in the best
  non-stating row;
- the completion: MRR of the exhaustive cosine ranking with the whole completion against its
  first token only (with a leading bare-space token, up to the first token that is not one).

Run: python -m tools.evaluations.study_misses [--world world2] [--seed 0] [--workdir attribdb-eval]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from tools.evaluations.baselines import mrr_and_recall, rank_documents
from tools.evaluations.worlds import WORLDS, commit, prepare_world

COMMON = 0.2  # a token in at least this share of rows counts as common


def statement_of(fact, text: str) -> tuple[int, int] | None:
    """Character span of the sentence in ``text`` that holds the fact's entity and value, if one does."""
    end = text.find(fact.value)
    entity = text.rfind(fact.entity, 0, end) if end >= 0 else -1
    if entity < 0:
        return None
    stop = text.rfind(". ", 0, entity)
    return (stop + 2 if stop >= 0 else 0), end + len(fact.value)


def token_chars(tokens: list[str]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for token in tokens:
        spans.append((at, at + len(token)))
        at += len(token)
    return spans


def share(contributions: list[float], chosen: list[bool]) -> float:
    total = sum(contributions)
    return sum(c for c, keep in zip(contributions, chosen) if keep) / total if total else 0.0


def first_piece(tokenizer, completion: str) -> str:
    """The completion's first token, or its first tokens up to one that is not white space: a BPE may
    cut " Polwi" into " " + "P" + ..., and a bare space asks nothing of the fact."""
    ids = tokenizer(completion)["input_ids"]
    end = next(n for n in range(1, len(ids) + 1) if tokenizer.decode(ids[:n]).strip())
    return tokenizer.decode(ids[:end])


def percentile(value: float, population: list[float]) -> float:
    return sum(v < value for v in population) / len(population)


def study_query(fact, hits, common_ids: set[int], by_row: dict, model) -> tuple[list[dict], dict]:
    """From one query's exact hits over every row: a record per stating document, and the query's own."""
    ranking = rank_documents([(h.doc_id, h.exact_normalized_score) for h in hits])
    selfs = [h.self_influence for h in hits]
    common = {(h.shard, h.row): [i in common_ids for i in by_row[h.shard, h.row].token_ids] for h in hits}
    documents = []
    for doc_id in fact.doc_ids:
        rows = [h for h in hits if h.doc_id == doc_id]
        best = max(rows, key=lambda h: h.exact_normalized_score)
        whole = statement_of(fact, "".join(best.tokens))
        record = {"found": ranking.index(doc_id) < 10, "split": not any(statement_of(fact, "".join(h.tokens))
                                                                       for h in rows),
                  "self percentile": percentile(best.self_influence, selfs),
                  "common share": share(best.token_contributions, common[best.shard, best.row])}
        if whole:
            inside = [s < whole[1] and e > whole[0] for s, e in token_chars(best.tokens)]
            record["statement share"] = share(best.token_contributions, inside)
            record["value loss"] = value_loss(model, by_row[best.shard, best.row].token_ids, fact, best)
        documents.append(record)
    rival = max((h for h in hits if h.doc_id not in fact.doc_ids), key=lambda h: h.exact_normalized_score)
    return documents, {"rival common share": share(rival.token_contributions, common[rival.shard, rival.row]),
                       "top states": ranking[0] in fact.doc_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="world2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-eval"))
    args = parser.parse_args()
    code = commit()  # at the start: the code that runs, not what HEAD is when the figures print

    from attribdb import api
    from attribdb.demo.train import known_facts

    prepared = prepare_world(args.world, args.workdir, args.seed)
    known = [f for f, k in zip(prepared.facts, known_facts(prepared.model_dir, prepared.facts)) if k]
    with api.open(prepared.db_path) as db:
        rows = db.engine.rows
        tokenizer, model = db.engine.runtime.tokenizer, db.engine.runtime.model
        by_row = {(shard, row): meta for shard, reader in db.engine.store.shards.items()
                  for row, meta in enumerate(reader.metadata(range(reader.rows)))}
        frequency = Counter(t for m in by_row.values() for t in set(m.token_ids))
        common_ids = {t for t, n in frequency.items() if n >= COMMON * rows}
        studies = [study_query(f, r.hits, common_ids, by_row, model)
                   for f, r in zip(known, db.exact_batch([(f.prompt, f.completion) for f in known], k=rows,
                                                         candidates=rows))]
        documents = [d for ds, _ in studies for d in ds]
        first_token = [(f.prompt, first_piece(tokenizer, f.completion)) for f in known]
        mrr = {}
        for label, queries in (("whole completion", [(f.prompt, f.completion) for f in known]),
                               ("first token only", first_token)):
            results = db.exhaustive(queries, k=rows)
            mrr[label] = statistics.mean(
                mrr_and_recall(rank_documents([(h.doc_id, h.normalized_score) for h in r.hits]), set(f.doc_ids))[0]
                for f, r in zip(known, results))

    groups = {"in the top 10": [d for d in documents if d["found"]],
              "missed": [d for d in documents if not d["found"]]}
    print(f"world {args.world}, seed {args.seed}, commit {code}: {len(known)} known queries of "
          f"{len(prepared.facts)}; {rows} rows; exact EK-FAC over every row, documents by their best row's cosine; "
          "a document's figures are its best row's; medians unless said")
    print(f"{'stating documents (per known query)':<62}" + "".join(f" {g:>14}" for g in groups))
    lines = (("count", lambda ds: f"{len(ds)}"),
             ("self-influence percentile among all rows", lambda ds: _median(ds, "self percentile")),
             ("loss of the value's tokens (nats/token)", lambda ds: _median(ds, "value loss")),
             ("share of the score on the statement's tokens", lambda ds: _median(ds, "statement share")),
             (f"share of the score on common tokens (in >= {COMMON:.0%} of rows)",
              lambda ds: _median(ds, "common share")),
             ("statement split across windows (share of documents)",
              lambda ds: f"{sum(d['split'] for d in ds) / len(ds):.3f}" if ds else "-"))
    for label, cell in lines:
        print(f"{label:<62}" + "".join(f" {cell(ds):>14}" for ds in groups.values()))
    queries = [q for _, q in studies]
    print(f"best non-stating row, share of its score on common tokens: "
          f"{statistics.median(q['rival common share'] for q in queries):.3f}; queries whose top document states "
          f"the fact: {sum(q['top states'] for q in queries)} of {len(queries)}")
    print("MRR of the exhaustive cosine ranking over known queries: "
          + ", ".join(f"{label} {value:.3f}" for label, value in mrr.items()))


def _median(documents, key) -> str:
    values = [d[key] for d in documents if d.get(key) is not None]
    return f"{statistics.median(values):.3f}" if values else "-"


def value_loss(model, ids: list[int], fact, hit) -> float | None:
    """The model's mean loss on the value's tokens in a stating row that holds them (None if it does not):
    near zero means the row is memorised, and its gradient small."""
    import torch

    start = "".join(hit.tokens).find(fact.value)
    if start < 0:
        return None
    inside = [s < start + len(fact.value) and e > start for s, e in token_chars(hit.tokens)]
    positions = torch.tensor([t for t, keep in enumerate(inside) if keep and t > 0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return float(torch.nn.functional.cross_entropy(logits[positions - 1], torch.tensor(ids)[positions]))


if __name__ == "__main__":
    main()
