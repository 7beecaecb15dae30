"""A batch of queries against the exhaustive pass over the same database, in one run.

A batch's default answer may recompute candidates' gradients; it must never cost more per query
than one exhaustive pass (every row recomputed once for the whole batch), which it takes itself
where its pricing says the candidates' union would cost more (docs/design.md).  This prints the
CPU seconds per query of ``exhaustive``, ``query_batch`` at the defaults and ``query_batch`` with
``rescore=0`` on one database and one file of queries, the three run in turn ``--repeats`` times
(medians: the machine is shared), and the ratios to the exhaustive pass.

    python -m tools.benchmarks.bench_batch DB --queries queries.jsonl

``queries.jsonl``: one ``{"prompt": ..., "completion": ...}`` per line, as ``attribdb query --queries``
reads.  Run with ``OMP_NUM_THREADS=1`` for one core's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import attribdb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--queries", type=Path, required=True, help="JSONL of prompt and completion")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    items = [(q["prompt"], q["completion"]) for q in map(json.loads, args.queries.read_text().splitlines())]
    with attribdb.open(args.db) as db:
        ways = {"exhaustive": lambda: db.exhaustive(items, k=10, quiet=True),
                "query_batch": lambda: db.query_batch(items, quiet=True),
                "query_batch rescore=0": lambda: db.query_batch(items, rescore=0, quiet=True)}
        ways["exhaustive"]()  # loads the factors and warms the caches, as a long-lived process has them
        seconds = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, run in ways.items():
                started = time.process_time()
                run()
                seconds[name].append((time.process_time() - started) / len(items))
        rows = db.info()["sequences"]
    per_query = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{args.db}: {rows} rows, {len(items)} queries in one batch, median of {args.repeats} runs, CPU s a query")
    for name, value in per_query.items():
        print(f"  {name:24s} {value:.3f}   ratio to exhaustive {value / per_query['exhaustive']:.2f}")


if __name__ == "__main__":
    main()
