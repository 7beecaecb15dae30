"""Counterfactual: remove the documents a method ranks highest, retrain, and see what the model forgot.

Fact tracing asks whether a method finds the documents that *state* a fact; this asks whether it
finds the documents the model's answer *depends on*, which is what influence claims to measure.
On an evaluation world (tools/evaluations/worlds.py), each method of ``baselines.method_rankings`` (plus k
random documents) names its top-k documents for every query; their union is removed from the
corpus and the model is retrained with the same seed and tokenizer.  Per query: the drop of
log p(completion | held-out prompt) against the model trained on everything, and whether a
completion the full model answered greedily is no longer answered (a flip).  Each seed trains the
world's model anew, ranks, removes and retrains; tables give mean ± standard deviation over seeds
of the per-seed means.  A retrained model is cached by the exact set of documents removed, so
methods that remove the same set share one training, and a rerun reuses every finished one.

Run: python -m tools.evaluations.eval_counterfactual [--world demo-small] [--seeds 0] [--k 3] [--workdir attribdb-eval]
     [--checkpoints 200 400 600]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import torch

from tools.evaluations.baselines import method_rankings
from tools.evaluations.worlds import (
    WORLDS,
    add_checkpoints_option,
    checkpoint_databases,
    commit,
    mean_spread,
    prepare_world,
    seeded,
    trajectory_databases,
)

SKIPPED = ("BM25, prompt only",)  # a fact-tracing reference, not one of the methods judged here


def completion_logprob(model_dir: Path, facts) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attribdb.tasks import CausalLMTask, collate_sequences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for fact in facts:
        prompt = tokenizer(fact.prompt)["input_ids"]
        batch = collate_sequences([prompt + tokenizer(fact.completion)["input_ids"]], tokenizer.pad_token_id,
                                  [len(prompt)])
        with torch.no_grad():
            out.append(-CausalLMTask().measurement(model, batch))
    return torch.stack(out)


def evaluate_seed(world: str, workdir: Path, seed: int, ks: list[int], methods: list[str] | None,
                  checkpoints: tuple[int, ...] = ()) -> dict:
    """Per (method, k): per-query drops, flips, and how many removed documents state a queried fact."""
    from attribdb import api
    from attribdb.demo.train import known_facts, train_model

    prepared = prepare_world(world, workdir, seed)
    folder = prepared.db_path.parent
    facts = prepared.facts
    docs = [json.loads(line) for line in prepared.corpus.read_text().splitlines()]
    checkpoint_dbs = checkpoint_databases(world, seed, prepared, checkpoints) if checkpoints else []
    trajectory_dbs = trajectory_databases(world, seed, prepared, checkpoints) if checkpoints else None
    with api.open(prepared.db_path) as db:
        all_rankings = method_rankings(db, docs, facts, index_k=100, checkpoint_dbs=checkpoint_dbs,
                                       trajectory_dbs=trajectory_dbs)
        rankings = {m: r for m, r in all_rankings.items() if m not in SKIPPED}
    rng = random.Random(seed)
    rankings["random"] = [rng.sample([d["id"] for d in docs], max(ks)) for _ in facts]
    if methods:
        rankings = {m: rankings[m] for m in methods}

    base = completion_logprob(prepared.model_dir, facts)
    known = torch.tensor(known_facts(prepared.model_dir, facts))
    stating = {d for f in facts for d in f.doc_ids}
    out = {"known": known, "once": torch.tensor([len(f.doc_ids) == 1 for f in facts]), "cells": {}}
    for k in ks:
        for method, ranked in rankings.items():
            removed = sorted({d for r in ranked for d in r[:k]})
            key = hashlib.sha256(json.dumps(removed).encode()).hexdigest()[:12]
            corpus = folder / f"without-{key}.jsonl"
            corpus.write_text("".join(json.dumps(d, sort_keys=True) + "\n"
                                      for d in docs if d["id"] not in set(removed)))
            model = train_model(corpus, folder / f"model-without-{key}", seeded(world, seed).model, progress=False,
                                tokenizer_from=prepared.model_dir)
            drop = base - completion_logprob(model, facts)
            flips = known & ~torch.tensor(known_facts(model, facts))
            out["cells"][method, k] = {"drop": drop, "flips": flips, "removed": len(removed),
                                       "stating": len(stating & set(removed))}
            print(f"world {world} seed {seed} k={k} {method}: removed {len(removed)} documents "
                  f"({len(stating & set(removed))} state a queried fact), mean drop {float(drop.mean()):.3f}, "
                  f"flips {int(flips.sum())}/{int(known.sum())}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="demo-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the world's model")
    parser.add_argument("--k", type=int, nargs="+", default=[3], help="documents removed per query and method")
    parser.add_argument("--methods", nargs="+", help="only these methods (each costs one training per k and seed; "
                        "BM25 is needed for the '> BM25' column); default: all")
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-eval"))
    add_checkpoints_option(parser)
    args = parser.parse_args()
    code = commit()  # at the start: the code that runs, not what HEAD is when the figures print

    runs = [evaluate_seed(args.world, args.workdir, seed, args.k, args.methods, tuple(args.checkpoints))
            for seed in args.seeds]
    queries, once = len(runs[0]["known"]), runs[0]["once"]
    print(f"world {args.world}, commit {code}, seeds {args.seeds}: {queries} queries "
          f"({', '.join(str(int(r['known'].sum())) for r in runs)} known per seed"
          + (f"; {int(once.sum())} of facts stated once" if once.any() else "") + "); top-k documents per query "
          "removed per method, model retrained from the same seed; mean ± sd over seeds of per-seed means")
    width = max(30, *(len(m) for m, _ in runs[0]["cells"]))
    for k in args.k:
        print(f"\nk = {k}")
        print(f"{'method':<{width}} {'drop of log p':>15} {'median':>15} {'flipped (known)':>16} {'> BM25 (share)':>15}"
              + (f" {'drop, once':>15} {'drop, many':>15}" if once.any() else "") + f" {'removed':>8} {'stating':>8}")
        for method in dict.fromkeys(m for m, kk in runs[0]["cells"] if kk == k):
            cells = [r["cells"][method, k] for r in runs]
            beats_bm25 = [float((c["drop"] > r["cells"]["BM25", k]["drop"]).double().mean())
                          for c, r in zip(cells, runs)]
            line = (f"{method:<{width}} {mean_spread([float(c['drop'].mean()) for c in cells]):>15} "
                    f"{mean_spread([float(c['drop'].median()) for c in cells]):>15} "
                    f"{mean_spread([float(c['flips'].sum() / r['known'].sum()) for c, r in zip(cells, runs)]):>16} "
                    f"{mean_spread(beats_bm25):>15}")
            if once.any():
                line += "".join(f" {mean_spread([float(c['drop'][mask].mean()) for c in cells]):>15}"
                                for mask in (once, ~once))
            print(line + f" {sum(c['removed'] for c in cells) / len(cells):>8.0f}"
                  f" {sum(c['stating'] for c in cells) / len(cells):>8.0f}")


if __name__ == "__main__":
    main()
