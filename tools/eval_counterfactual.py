"""Counterfactual: remove the documents a method ranks highest, retrain, and see what the model forgot.

On a reduced demo (invented facts in real English text), each method names
its top-k documents for every fact; the union is removed from the corpus and
the tiny model is retrained from the same seed with the same tokenizer.  The
figure is how much the log-probability of each fact's completion (held-out
prompt) drops against the model trained on everything, for attribdb (ranked
by its normalised form, the default, and by score), BM25 text retrieval, and k random
documents per fact; over all facts and split by whether the full model
completes the fact (known) or not.

Run: python tools/eval_counterfactual.py [--workdir /tmp/attribdb-counterfactual] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BM25, attribdb_rankings  # noqa: E402

from attribdb.demo.facts import DemoCorpusConfig  # noqa: E402
from attribdb.demo.run import DemoConfig, prepare  # noqa: E402
from attribdb.demo.train import DemoModelConfig, known_facts, train_model  # noqa: E402

CONFIG = DemoConfig(DemoCorpusConfig(facts_per_relation=8, background_docs=400),
                    DemoModelConfig(train_steps=500), {"max_length": 128, "fit_sample_size": 256}, 1)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-counterfactual"))
    parser.add_argument("--k", type=int, default=3, help="documents removed per fact and method")
    args = parser.parse_args()

    from attribdb import api

    prepared = prepare(args.workdir, CONFIG, "counterfactual")
    facts = prepared.facts
    docs = [json.loads(line) for line in prepared.corpus.read_text().splitlines()]
    doc_ids = [d["id"] for d in docs]

    removals = {}
    with api.open(prepared.db_path) as db:
        for method, rank_by in (("attribdb", "normalized"), ("attribdb by score", "score")):
            removals[method] = [ranked[: args.k] for ranked in attribdb_rankings(db, facts, 100, rank_by)]
    bm25 = BM25([d["text"] for d in docs])
    removals["BM25"] = []
    for fact in facts:
        scores = bm25.scores(fact.prompt + fact.completion)
        removals["BM25"].append([doc_ids[i] for i in sorted(range(len(docs)), key=lambda i: -scores[i])[: args.k]])
    rng = random.Random(0)
    removals["random"] = [rng.sample(doc_ids, args.k) for _ in facts]

    base = completion_logprob(prepared.model_dir, facts)
    drops = {}
    for method, per_fact in removals.items():
        removed = {d for chosen in per_fact for d in chosen}
        corpus = args.workdir / f"without-{method}.jsonl"
        corpus.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs if d["id"] not in removed))
        model = train_model(corpus, args.workdir / f"model-without-{method}", CONFIG.model,
                            tokenizer_from=prepared.model_dir)
        drops[method] = base - completion_logprob(model, facts)
        stated = sum(len(set(chosen) & set(f.doc_ids)) for chosen, f in zip(per_fact, facts))
        print(f"{method}: removed {len(removed)} documents, {stated} of them state a queried fact", file=sys.stderr)

    known = torch.tensor(known_facts(prepared.model_dir, facts))
    print(f"{len(facts)} facts ({int(known.sum())} known: the full model completes them), top-{args.k} documents "
          "removed per fact and method, model retrained from the same seed")
    print(f"{'method':<20} {'mean drop of log p(completion)':>32} {'median':>8} {'facts where drop > BM25':>24} "
          f"{'mean drop, known':>17} {'mean drop, unknown':>19}")
    for method, drop in drops.items():
        wins = float((drop > drops["BM25"]).double().mean())
        print(f"{method:<20} {float(drop.mean()):>32.3f} {float(drop.median()):>8.3f} {wins:>24.2f} "
              f"{float(drop[known].mean()):>17.3f} {float(drop[~known].mean()):>19.3f}")


if __name__ == "__main__":
    main()
