"""A trajectory database's costs, as ratios to single-model databases measured in the same run.

On an evaluation world's trained model and its checkpoints (the same training run the
evaluations use, cached in the workdir):

- build: one database of the C models against C single-model builds of the same corpus and
  settings, each from scratch (fit included) (goal: <= 1.1);
- query latency with ``rescore=0`` (the stored rows' answer) at C checkpoints against a query of the
  final model's database, per query, after a warm-up (goal at C = 4: <= 1.5);
- bytes per sequence all-in, as `attribdb info` prices them, against ``--row-bytes``.

Run: python -m tools.benchmarks.bench_trajectory [--world world2] [--seed 0] [--steps 200 400 600]
     [--workdir attribdb-eval]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tools.evaluations.worlds import WORLDS, checkpoint_run, prepare_world, seeded


def timed_build(path: Path, corpus: Path, model: Path, checkpoints: list[Path], settings: dict) -> float:
    from attribdb import api

    started = time.perf_counter()
    api.build(path, str(corpus), str(model), quiet=True, checkpoints=[str(c) for c in checkpoints], **settings)
    return time.perf_counter() - started


def per_query_ms(db, queries: list, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of a query in a batch of ``queries``, rescore=0, k=10."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        db.query_batch(queries, k=10, rescore=0, quiet=True)
        times.append((time.perf_counter() - started) / len(queries) * 1000)
    return statistics.median(times)


def main() -> None:
    from attribdb import api

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="world2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 400, 600])
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-eval"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    prepared = prepare_world(args.world, args.workdir, args.seed)
    run, _ = checkpoint_run(args.world, args.seed, prepared, tuple(args.steps))
    models = [prepared.model_dir] + [run / f"checkpoint-{step}" for step in args.steps]
    settings = seeded(args.world, args.seed).build
    scratch = Path(tempfile.mkdtemp(prefix="bench-trajectory-"))
    try:
        singles = [timed_build(scratch / f"single-{i}", prepared.corpus, model, [], settings)
                   for i, model in enumerate(models)]
        together = timed_build(scratch / "trajectory", prepared.corpus, models[0], models[1:], settings)
        queries = [(f.prompt, f.completion) for f in prepared.facts]
        with api.open(scratch / "single-0") as single, api.open(scratch / "trajectory") as trajectory:
            for db in (single, trajectory):
                db.query_batch(queries[:2], rescore=0, quiet=True)  # models, factors and indexes loaded
            single_ms = per_query_ms(single, queries, args.repeats)
            trajectory_ms = per_query_ms(trajectory, queries, args.repeats)
            costs = [db.info()["row"]["all_in"]["total"] for db in (single, trajectory)]
            row_bytes = single.info()["settings"]["row_bytes"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    c = len(models)
    print(f"world {args.world} seed {args.seed}: the model and checkpoints {args.steps} (C = {c}), "
          f"{len(queries)} queries, settings {settings}")
    print(f"build: {c} single builds {sum(singles):.1f} s ({', '.join(f'{s:.1f}' for s in singles)}); "
          f"one trajectory build {together:.1f} s")
    print(f"query, rescore=0, k=10: final model {single_ms:.1f} ms, trajectory {trajectory_ms:.1f} ms per query")
    print(f"bytes per sequence all-in: single {costs[0]}, trajectory {costs[1]} (--row-bytes {row_bytes})")
    print(f"ratios: build {together / sum(singles):.2f} (goal <= 1.1); query {trajectory_ms / single_ms:.2f} "
          f"(goal <= 1.5 at C = 4); bytes {costs[1] / row_bytes:.3f} of --row-bytes")


if __name__ == "__main__":
    main()
