"""Fact tracing: does attribution find the documents that state a queried fact?

On an evaluation world (tools/evaluations/worlds.py: invented facts stated by paraphrases in real English
text; each query uses a phrasing no document uses for that fact), for every query: rank the
training documents by each method of ``baselines.method_rankings`` and report MRR (of the first
document that states the fact) and recall@10 (of all of them), over all queries, over those the
model completes correctly (known) and those it does not (unknown), and, where the world has both,
over facts stated once and facts stated many times.  Each seed trains the world's model anew; the
tables give mean ± standard deviation over seeds.  Also: how many rows of the exhaustive top 10
the index answer returns (index fidelity on this trained model).

Run: python -m tools.evaluations.eval_facts [--world demo] [--seeds 0] [--workdir attribdb-eval] \
[--checkpoints 200 400 600]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tools.benchutil import recall
from tools.evaluations.baselines import attribdb_rankings, method_rankings, mrr_and_recall
from tools.evaluations.worlds import (
    WORLDS,
    add_checkpoints_option,
    checkpoint_databases,
    commit,
    mean_spread,
    prepare_world,
    trajectory_databases,
)


def index_recall(db, facts, k: int = 10) -> dict[str, float]:
    """Per ranking, the share of the exhaustive top-k rows that the index answer (default candidates) returns."""
    queries = [(f.prompt, f.completion) for f in facts]
    truths = db.exhaustive(queries, k=k, rank_by="both")  # one pass over the corpus for both rankings
    return {rank_by: recall(db.query_batch(queries, k=k, rank_by=rank_by), truth, k)
            for rank_by, truth in truths.items()}


def subsets(facts, known: list[bool]) -> dict[str, list[bool]]:
    """Query subsets worth a column: all, known/unknown, and stated once/many when the world has both."""
    out = {"all": [True] * len(facts), "known": known, "unknown": [not k for k in known],
           "once": [len(f.doc_ids) == 1 for f in facts], "many": [len(f.doc_ids) > 1 for f in facts]}
    return {name: chosen for name, chosen in out.items() if any(chosen) and (name != "many" or any(out["once"]))}


def evaluate_seed(world: str, workdir: Path, seed: int, dump: Path | None = None, exact: bool = False,
                  checkpoints: tuple[int, ...] = ()) -> dict:
    """One trained model: per method and subset, (MRR, recall@10); plus known counts and index fidelity."""
    from attribdb import api
    from attribdb.demo.train import known_facts

    prepared = prepare_world(world, workdir, seed)
    facts = prepared.facts
    docs = [json.loads(line) for line in prepared.corpus.read_text().splitlines()]
    checkpoint_dbs = checkpoint_databases(world, seed, prepared, checkpoints) if checkpoints else []
    trajectory_dbs = trajectory_databases(world, seed, prepared, checkpoints) if checkpoints else None
    timings: dict[str, float] = {}
    with api.open(prepared.db_path) as db:
        # the default query path (k=10, default candidates) first; the others rank deeper, for MRR past rank 10
        started = time.time()
        rankings = {"attribdb default (k=10)": attribdb_rankings(db, facts, 10, "normalized")}
        timings["attribdb default (k=10)"] = time.time() - started
        # fact tracing only (no retraining): exact mode, and the query tool's own BM25 prefilter (FTS5 over
        # rows, where method_rankings' "BM25 top 100 + influence" and hybrid fuse documents)
        extra = [("attribdb --prefilter bm25:100", "prefilter", "normalized"),
                 ("attribdb --prefilter bm25:100 --rank-by hybrid", "prefilter", "hybrid")]
        if exact:  # every returned row's per-token contributions too: minutes per seed
            extra += [("attribdb exact (k=100)", "exact", "normalized"),
                      ("attribdb exact (k=100), by score", "exact", "score")]
        for method, mode, rank_by in extra:
            started = time.time()
            rankings[method] = attribdb_rankings(db, facts, 100, rank_by, mode=mode)
            timings[method] = time.time() - started
        rankings.update(method_rankings(db, docs, facts, timings=timings, checkpoint_dbs=checkpoint_dbs,
                                       trajectory_dbs=trajectory_dbs))
        fidelity = index_recall(db, facts)
    known = known_facts(prepared.model_dir, facts)
    if dump:  # every ranking, for analyses that need no model (e.g. other fusions of the same lists)
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{world}-seed-{seed}.json").write_text(json.dumps(
            {"facts": [{"prompt": f.prompt, "completion": f.completion, "doc_ids": list(f.doc_ids)} for f in facts],
             "known": known, "rankings": rankings}))
    table = {}
    for method, ranked in rankings.items():
        for name, chosen in subsets(facts, known).items():
            pairs = [mrr_and_recall(r, set(f.doc_ids)) for r, f, keep in zip(ranked, facts, chosen) if keep]
            table[method, name] = (sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs))
    return {"table": table, "known": sum(known), "queries": len(facts), "documents": len(docs),
            "fidelity": fidelity, "timings": timings, "subsets": {n: sum(c) for n, c in subsets(facts, known).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the world's model")
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-eval"))
    add_checkpoints_option(parser)
    parser.add_argument("--dump", type=Path, help="also write each seed's rankings and known queries as JSON here")
    parser.add_argument("--exact", action="store_true", help="also rank by exact mode (k=100; slow: per-token "
                        "contributions of 200 rows per query)")
    args = parser.parse_args()
    code = commit()  # at the start: the code that runs, not what HEAD is when the figures print

    runs = {seed: evaluate_seed(args.world, args.workdir, seed, args.dump, args.exact, tuple(args.checkpoints))
            for seed in args.seeds}
    first = runs[args.seeds[0]]
    print(f"world {args.world}, commit {code}, seeds {args.seeds}: {first['queries']} queries, "
          f"{first['documents']} documents; the model completes "
          + ", ".join(f"{r['known']}" for r in runs.values()) + f" of the {first['queries']} held-out phrasings "
          "(known; per seed). Unknown queries: influence explains what the model predicts instead")
    names = list(first["subsets"])
    print("query subsets (seed " + str(args.seeds[0]) + "): "
          + ", ".join(f"{n} {c}" for n, c in first["subsets"].items()))
    methods = list(dict.fromkeys(m for m, _ in first["table"]))
    width = max(32, *(len(m) + 1 for m in methods))
    for column, label in ((0, "MRR"), (1, "recall@10")):
        print(f"\n{label}, mean ± sd over {len(runs)} seed(s)")
        print(f"{'method':<{width}}" + "".join(f" {n:>16}" for n in names) + f" {'seconds':>8}")
        for method in methods:
            cells = [mean_spread([r["table"][method, n][column] for r in runs.values() if (method, n) in r["table"]])
                     for n in names]
            seconds = sum(r["timings"].get(method, 0.0) for r in runs.values()) / len(runs)
            print(f"{method:<{width}}" + "".join(f" {c:>16}" for c in cells) + f" {seconds:>8.1f}")
    print("\nindex answers vs exhaustive on these trained models, recall@10 of rows: "
          + ", ".join(f"{rank_by} {mean_spread([r['fidelity'][rank_by] for r in runs.values()])}"
                      for rank_by in ("normalized", "score")))


if __name__ == "__main__":
    main()
