"""Where a fit's time goes, part by part, against the training steps of the same sequences.

tools/benchmarks/bench_build.py says whether the fit meets its goal (<= 3x the fit sample's training steps at
12x768); this says why.  It runs a real `api.fit` on the bench's GPT-2-small-shaped model and corpus
(made by tools/benchmarks/bench_build.py in the same workdir, or here if missing) with the fitting module's
parts timed in place:

- captures: the forward and backward passes of both passes (model, hooks, captured copies);
- covariances: summing a aᵀ and δ δᵀ;
- eigendecompositions: a fixed cost per fit, whatever the sample;
- correction: the eigenvalue correction's rotations, products and squares;
- the rest: corpus reading, label sampling, row projections, writing the factors.

A small sample (64 sequences, 8 batches) gives the per-batch costs in minutes; each part's
per-batch share divided by a training step's is what a full fit would show.

Run: OMP_NUM_THREADS=1 python -m tools.benchmarks.profile_fit [--precision bfloat16] [--sequences 64]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import time
from pathlib import Path

from tools.benchmarks.bench_build import SETTINGS, SHAPES, training_step_rate
from tools.benchutil import english_paragraphs, make_model, write_corpus

PARTS = {"captures": ("GradientRunner", "train_captures"), "covariances": ("_Covariances", "add"),
         "eigendecompositions": (None, "eigh"), "correction": (None, "squared_rotated_gradients")}


def timed_parts() -> dict[str, float]:
    """Wrap the fitting module's parts so each call adds its seconds to the returned totals."""
    from attribdb import fitting

    totals = collections.defaultdict(float)

    def wrap(name, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
        return timed

    for name, (owner, attribute) in PARTS.items():
        holder = getattr(fitting, owner) if owner else fitting
        setattr(holder, attribute, wrap(name, getattr(holder, attribute)))
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bfloat16", help="fit precision (float32, bfloat16)")
    parser.add_argument("--sequences", type=int, default=64, help="fit sample size")
    parser.add_argument("--small-docs", type=int, default=220, help="documents of the bench corpus, if made here")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-bench-build"))
    args = parser.parse_args()

    from attribdb import api

    shape = SHAPES["gpt2-small"]
    model = make_model(args.workdir / "model-gpt2-small", english_paragraphs(), layers=shape.layers, width=shape.width)
    corpus = args.workdir / "corpus-gpt2-small-once.jsonl"
    if not corpus.exists():
        write_corpus(corpus, args.small_docs)
    db = args.workdir / f"profile-{args.precision}"
    shutil.rmtree(db, ignore_errors=True)
    totals = timed_parts()
    started = time.perf_counter()
    api.fit(db, corpus, model, quiet=True, **SETTINGS, fit_sample_size=args.sequences, fit_precision=args.precision)
    total = time.perf_counter() - started
    shutil.rmtree(db, ignore_errors=True)
    steps = args.sequences / training_step_rate(model, corpus, args.sequences)
    batches = -(-args.sequences // SETTINGS["batch_size"])

    print(f"fit of {args.sequences} sequences at {args.precision}: {total:.1f} s = {total / steps:.2f}× their "
          f"training steps ({steps:.1f} s, {steps / batches:.2f} s per batch of {SETTINGS['batch_size']})")
    rest = total - sum(totals.values())
    for name, seconds in [*totals.items(), ("the rest", rest)]:
        per_batch = "" if name == "eigendecompositions" else f", {seconds / batches:.2f} s per batch"
        print(f"  {name:20s} {seconds:7.1f} s = {seconds / steps:.2f}× the steps{per_batch}")


if __name__ == "__main__":
    main()
