"""Why does influence miss the documents that state a fact, where it does?  Numbers per suspected cause.

On a world and seed of tools/worlds.py (the cached model and database), for every query the model
completes (known), every row is recomputed without compression (exact mode over all rows: EK-FAC
scores with per-token contributions), documents are ranked by their best row's cosine score, and
the queries are split into those whose first stating document is in the top 10 (found) and the
rest (missed).  For each group:

- memorisation: the percentile of the stating rows' self-influence among all rows (a fitted
  sequence has a small gradient, so a small self-influence), and of the stating rows' loss on the
  fact's value;
- split windows: the share of stating documents whose statement no single row holds whole;
- where the score sits: the share of a stating row's score carried by the statement's own tokens,
  and the share of the best-ranked row's score carried by common tokens (those in ≥ 20% of rows);
- the completion: MRR of the exhaustive cosine ranking with the whole completion against its
  first token only.

Run: python tools/study_misses.py [--world world2] [--seed 0] [--workdir attribdb-eval]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from baselines import mrr_and_recall, rank_documents  # noqa: E402
from worlds import WORLDS, commit, prepare_world  # noqa: E402

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


def percentile(value: float, population: list[float]) -> float:
    return sum(v < value for v in population) / len(population)


def study_query(fact, hits, common_ids: set[int], by_row: dict, model) -> dict:
    """The numbers of one query, from its exact hits over every row."""
    ranking = rank_documents([(h.doc_id, h.exact_normalized_score) for h in hits])
    found = mrr_and_recall(ranking, set(fact.doc_ids))[0] >= 0.1
    selfs = [h.self_influence for h in hits]
    stating = [h for h in hits if h.doc_id in fact.doc_ids]
    out = {"found": found, "self percentile": [], "statement share": [], "split": [],
           "value loss": [value_loss(model, by_row[h.shard, h.row]["token_ids"], fact, h) for h in stating]}
    out["value loss"] = [v for v in out["value loss"] if v is not None]
    for doc_id in fact.doc_ids:
        rows = [h for h in stating if h.doc_id == doc_id]
        whole = [h for h in rows if statement_of(fact, "".join(h.tokens))]
        out["split"].append(not whole)
        for h in whole:
            start, end = statement_of(fact, "".join(h.tokens))
            inside = [s < end and e > start for s, e in token_chars(h.tokens)]
            out["statement share"].append(share(h.token_contributions, inside))
            out["self percentile"].append(percentile(h.self_influence, selfs))
    top = max(hits, key=lambda h: h.exact_normalized_score)
    out["top common share"] = share(top.token_contributions,
                                    [i in common_ids for i in by_row[top.shard, top.row]["token_ids"]])
    out["top states"] = top.doc_id in fact.doc_ids
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="world2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-eval"))
    args = parser.parse_args()

    from attribdb import api
    from attribdb.demo.train import known_facts

    prepared = prepare_world(args.world, args.workdir, args.seed)
    known = [f for f, k in zip(prepared.facts, known_facts(prepared.model_dir, prepared.facts)) if k]
    with api.open(prepared.db_path) as db:
        rows = db.engine.rows
        tokenizer, model = db.engine.runtime.tokenizer, db.engine.runtime.model
        by_row = {(shard, row): meta for shard, reader in db.engine.shards.items()
                  for row, meta in enumerate(reader.metadata(range(reader.rows)))}
        frequency = Counter(t for m in by_row.values() for t in set(m["token_ids"]))
        common_ids = {t for t, n in frequency.items() if n >= COMMON * rows}
        studies = [study_query(f, r.hits, common_ids, by_row, model)
                   for f, r in zip(known, db.exact_batch([(f.prompt, f.completion) for f in known], k=rows,
                                                         candidates=rows))]
        first_token = [(f.prompt, tokenizer.decode(tokenizer(f.completion)["input_ids"][:1])) for f in known]
        mrr = {}
        for label, queries in (("whole completion", [(f.prompt, f.completion) for f in known]),
                               ("first token only", first_token)):
            results = db.exhaustive(queries, k=rows)
            mrr[label] = statistics.mean(
                mrr_and_recall(rank_documents([(h.doc_id, h.normalized_score) for h in r.hits]), set(f.doc_ids))[0]
                for f, r in zip(known, results))

    groups = {"found (top 10)": [s for s in studies if s["found"]], "missed": [s for s in studies if not s["found"]]}
    print(f"world {args.world}, seed {args.seed}, commit {commit()}: {len(known)} known queries of "
          f"{len(prepared.facts)}; {rows} rows; exact EK-FAC over every row, cosine ranking; medians unless said")
    print(f"{'':<62}" + "".join(f" {g:>16}" for g in groups))
    lines = (("queries", lambda ss: f"{len(ss)}"),
             ("stating rows: self-influence percentile among all rows", lambda ss: _median(ss, "self percentile")),
             ("stating rows: loss of the value's tokens (nats/token)", lambda ss: _median(ss, "value loss")),
             ("stating documents whose statement no row holds whole", lambda ss: _mean(ss, "split")),
             ("stating rows: share of score on the statement's tokens", lambda ss: _median(ss, "statement share")),
             (f"top row: share of score on common tokens (>= {COMMON:.0%} of rows)",
              lambda ss: f"{statistics.median(s['top common share'] for s in ss):.3f}" if ss else "-"),
             ("top row states the fact", lambda ss: f"{sum(s['top states'] for s in ss) / len(ss):.3f}" if ss else "-"))
    for label, cell in lines:
        print(f"{label:<62}" + "".join(f" {cell(ss):>16}" for ss in groups.values()))
    print("MRR of the exhaustive cosine ranking over known queries: "
          + ", ".join(f"{label} {value:.3f}" for label, value in mrr.items()))


def _median(studies, key) -> str:
    values = [v for s in studies for v in s[key]]
    return f"{statistics.median(values):.3f}" if values else "-"


def _mean(studies, key) -> str:
    values = [v for s in studies for v in s[key]]
    return f"{statistics.mean(values):.3f}" if values else "-"


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
