"""Does a bfloat16 fit change the answers?  ``fit_precision=bfloat16`` against the float32 fit on trained models.

The low-precision fit (attribdb.factors.FIT_PRECISIONS) runs the fit's forward and backward passes
under bfloat16 autocast, its eigenvalue correction in bfloat16 and its eigendecompositions in float32.
Its error is judged against a yardstick the fit has anyway: the float32 fit with another fit seed,
which samples other labels for the true Fisher.  If bfloat16 moves the scores less than re-sampling
does, its rounding is below the fit's own noise.

For each trained model (tools/evaluations/trained_models.py), three fits on the same sequences: float32 at seed 0
(the reference), float32 at seed 1, bfloat16 at seed 0.  Against the reference, per fit: the relative
Frobenius difference of the corrected eigenvalues Λ (over every module), Pearson and Spearman of the
exhaustive EK-FAC scores of the fact queries against every row, recall@10 of the top rows by the
default cosine ranking, and the fact-tracing MRR of that ranking.  The fit's time is printed too;
tools/benchmarks/bench_build.py measures its ratio to training steps at 12×768.

Run: OMP_NUM_THREADS=1 python -m tools.evaluations.eval_fit_precision [--model-set both] [--rows 1000 --queries 60]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tools.evaluations.measures import (
    batches_of,
    choose_rows,
    flat_scores,
    log,
    mean_mrr,
    pearson,
    recall_at,
    round_robin,
    spearman,
)
from tools.evaluations.trained_models import MODEL_SETS, TrainedModel, add_evaluation_options

FITS = {"float32, seed 0 (reference)": ("float32", 0), "float32, seed 1": ("float32", 1),
        "bfloat16, seed 0": ("bfloat16", 0)}


def exhaustive_scores(model, task, factors, query_batch, row_batches, n_rows: int):
    """(queries × rows) EK-FAC scores and each row's self-influence, every row's Ĝ formed densely."""
    from attribdb.influence import InfluenceComputer, self_influence

    computer = InfluenceComputer(model, task, factors)
    query = computer.query_preconditioned(query_batch)
    scores = torch.zeros(next(iter(query.values())).shape[0], n_rows, dtype=torch.float64)
    row_self = torch.zeros(n_rows, dtype=torch.float64)
    for positions, batch in row_batches:
        rows = computer.train_preconditioned(batch)
        scores[:, positions] = flat_scores(query, rows).double()
        row_self[positions] = self_influence(rows).double()
    return scores, scores / row_self.sqrt().clamp_min(1e-300)


def evaluate(trained: TrainedModel, args) -> list[dict]:
    from attribdb.factors import FactorConfig
    from attribdb.fitting import fit_factors
    from attribdb.models import load_model
    from attribdb.tasks import CausalLMTask, collate_sequences
    from attribdb.tracking import find_tracked_modules

    model, tokenizer = load_model(trained.model_dir, "cpu")
    task = CausalLMTask()
    modules = find_tracked_modules(model, task.module_patterns)
    pad = tokenizer.pad_token_id
    doc_ids, row_ids, docs = choose_rows(trained.corpus, tokenizer, args.rows, args.max_length, args.seed)
    facts = round_robin(trained.facts, args.queries)
    sample = random.Random(args.seed + 1).sample(docs, min(args.fit_sequences, len(docs)))
    fit_ids = [t for t in (tokenizer(d["text"])["input_ids"][:args.max_length] for d in sample) if len(t) >= 2]
    fit_batches = [b for _, b in batches_of(fit_ids, pad, args.batch_size)]
    prompts = [tokenizer(f.prompt)["input_ids"] for f in facts]
    query_batch = collate_sequences([p + tokenizer(f.completion)["input_ids"] for p, f in zip(prompts, facts)], pad,
                                    [len(p) for p in prompts])
    row_batches = batches_of(row_ids, pad, args.batch_size)
    log(f"{trained.name}: {len(modules)} modules, {len(doc_ids)} rows, {len(facts)} queries, "
        f"{len(fit_ids)} fit sequences")

    results = {}
    for label, (precision, seed) in FITS.items():
        started = time.perf_counter()
        factors = fit_factors(model, task, fit_batches, FactorConfig(seed=seed, precision=precision), modules)
        seconds = time.perf_counter() - started
        scores, cosines = exhaustive_scores(model, task, factors, query_batch, row_batches, len(doc_ids))
        eigenvalues = torch.cat([factors[m.name].diagonal.flatten() for m in modules])
        results[label] = {"seconds": seconds, "scores": scores, "cosines": cosines, "eigenvalues": eigenvalues}
        log(f"{trained.name}: fit {label} in {seconds:.1f}s, scored")

    reference = results[next(iter(FITS))]
    table = []
    for label, r in results.items():
        table.append({
            "model": trained.name, "fit": label, "fit seconds": r["seconds"],
            "Λ difference": float((r["eigenvalues"] - reference["eigenvalues"]).norm()
                                  / reference["eigenvalues"].norm()),
            "Pearson": pearson(r["scores"], reference["scores"]),
            "Spearman": spearman(r["scores"], reference["scores"]),
            "recall@10": recall_at(r["cosines"], reference["cosines"], 10),
            "MRR": mean_mrr(r["cosines"], doc_ids, facts),
        })
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_evaluation_options(parser, rows=1000)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    rows = [line for make in MODEL_SETS[args.model_set] for line in evaluate(make(args.workdir), args)]
    columns = ("fit seconds", "Λ difference", "Pearson", "Spearman", "recall@10", "MRR")
    print(f"\n{'model':<24} {'fit':<28}" + "".join(f" {c:>13}" for c in columns))
    for line in rows:
        print(f"{line['model']:<24} {line['fit']:<28}" + "".join(f" {line[c]:>13.4f}" for c in columns))
    print("Λ difference, Pearson, Spearman and recall@10 are against the float32 seed-0 fit; MRR is each fit's own")


if __name__ == "__main__":
    main()
