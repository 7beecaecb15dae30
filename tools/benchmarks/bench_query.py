"""Query latency and recall of the index path against the exhaustive ground truth, in one run.

Builds (or reuses) a database of at least 20,000 sequences of real English
text (the Python documentation shipped with the standard library) for a small
GPT-2, then prints:

- p50 / p95 latency of one query through the index (FAISS over the stored rows, then
  the candidates' per-module scores from the same rows);
- the exhaustive path (every row recomputed: what kronfluence does) and the
  ratio of the two, on a quarter of the corpus and on all of it (goal: >= 1000x
  at 20,000 sequences, growing with the corpus);
- recall@10 and recall@100 of the index (default rescoring) against exhaustive, and
  of exact mode, which recomputes every candidate without compression (a random-init model
  flatters nothing here: its spectrum is flat, so rows keep less than on a trained
  model; tools/evaluations/eval_rows.py measures fidelity on trained ones);
- index latency as a ratio to one forward+backward pass of the query (the floor);
- the query process's memory next to the size of the FAISS indexes.

With ``--wide DB --copies N`` it measures latency at a realistic width instead:
DB is a database built on a GPT-2-small-shaped model (tools/benchmarks/bench_build.py leaves
one), its shards are copied N times into a scratch database (the rows repeat, so
only the latency and memory figures mean anything), and the index p50 is set
against one forward+backward of the query on that model (goal: <= 3x at >= 10^4 rows).

With ``--rows N`` it measures scale instead (tools/benchmarks/bench_scale.py): a database of N
short sequences on a tiny model, its index latency, recall@10 against brute force
over the stored rows, memory and disk, with the index kind the default rule picks.
With ``--rows N --synthetic`` the rows are synthetic, of the default size, written through the
real store and indexes (tools/benchmarks/synthetic_rows.py): p50, p95, RSS, disk and file count.

Run: python -m tools.benchmarks.bench_query [--docs 4800] [--workdir /tmp/attribdb-bench-query]
     python -m tools.benchmarks.bench_query --wide /tmp/attribdb-bench-build/db-gpt2-small-once --copies 100
     python -m tools.benchmarks.bench_query --rows 1000000 [--row-bytes 1024] [--workdir /tmp/attribdb-bench-rows]
     python -m tools.benchmarks.bench_query --rows 1000000 --synthetic [--workdir /tmp/attribdb-bench-synthetic]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from attribdb.query.options import QueryOptions
from tools.benchutil import english_paragraphs, make_model, peak_rss_mib, recall, write_corpus

SETTINGS = {"max_length": 64, "batch_size": 16, "shard_size": 4096, "commit_rows": 64, "fit_sample_size": 512}
N_QUERIES = 20


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_queries(seed: int = 1) -> list[dict]:
    """In-distribution queries: a paragraph's opening words as prompt, the next words as completion."""
    rng = random.Random(seed)
    queries = []
    for paragraph in rng.sample(english_paragraphs(), N_QUERIES):
        words = paragraph.split()
        queries.append({"prompt": " ".join(words[:8]), "completion": " " + " ".join(words[8:14])})
    return queries


def faiss_mib(engine) -> float:
    """The database index's file (shards without one are scanned from their rows: no FAISS file)."""
    from attribdb import layout

    recorded = engine.store.indexes.recorded
    return (engine.runtime.root / layout.INDEX_DIR / recorded["file"]).stat().st_size / 2 ** 20 if recorded else 0.0


def distinct_sequences(engine) -> int:
    """Identical rows tie in every ranking; the corpus should have few of them for recall to mean anything."""
    return len({m.token_ids for reader in engine.store.shards.values()
                for m in reader.metadata(range(reader.rows))})


def floor_seconds(runtime, queries) -> float:
    """Median time of one plain forward+backward pass of a query through the model."""
    from attribdb.tasks import CausalLMTask, collate_sequences

    tokenizer, model, task = runtime.tokenizer, runtime.model, CausalLMTask()
    times = []
    for q in queries:
        prompt = tokenizer(q["prompt"])["input_ids"]
        batch = collate_sequences([prompt + tokenizer(q["completion"])["input_ids"]], tokenizer.pad_token_id,
                                  score_from=[len(prompt)])
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        task.measurement(model, batch).backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def time_index(engine, items, label: str) -> dict:
    """Latency of the index path.

    Every engine is timed before any exhaustive pass runs in the process: that pass
    leaves the allocator and the page cache in another state, and timings after it
    were a third slower."""
    first_pass = []  # rows read for the first time since the process started (page cache permitting)
    for item in items:
        started = time.perf_counter()
        list(engine.query([item], QueryOptions(k=10)))
        first_pass.append(time.perf_counter() - started)
    latencies, answers, laps = [], [], {}
    for item in items:
        started = time.perf_counter()
        answers += engine.query([item], QueryOptions(k=10))
        latencies.append(time.perf_counter() - started)
        for lap, ms in answers[-1].timings_ms.items():
            laps.setdefault(lap, []).append(ms)
    print(f"{label} laps (median ms): " + ", ".join(f"{lap} {statistics.median(v):.1f}" for lap, v in laps.items()),
          file=sys.stderr)
    ordered = sorted(latencies)
    return {"rows": engine.rows, "p50": statistics.median(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))],
            "p50_first": statistics.median(first_pass), "rss_index": current_rss_mib(), "faiss_mib": faiss_mib(engine),
            "answers": answers}


def against_truth(engine, items, figures: dict, label: str) -> dict:
    """Recall of the timed answers, and of exact mode, against the exhaustive ground truth."""
    index_100 = list(engine.query(items, QueryOptions(k=100, candidates=400)))
    exact_latencies, exact_results = [], []
    for item in items:
        started = time.perf_counter()
        exact_results += engine.exact([item], QueryOptions(k=10))
        exact_latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    truth = engine.exhaustive(items, QueryOptions(k=100), quiet=False)["normalized"]
    answers = figures.pop("answers")
    figures |= {"exhaustive": time.perf_counter() - started,
                "recall10": recall(answers, truth, 10),
                "recall100": recall(index_100, truth, 100),
                "exact_p50": statistics.median(exact_latencies), "exact_recall10": recall(exact_results, truth, 10)}
    print(f"{label}: {figures}", file=sys.stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4800)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-bench-query"))
    parser.add_argument("--model", type=Path, help="a local model folder (default: a small random GPT-2)")
    parser.add_argument("--wide", type=Path, help="a database on a wide model: measure its latency only")
    parser.add_argument("--copies", type=int, default=100, help="with --wide: copies of its shards")
    parser.add_argument("--rows", type=int, help="measure scale: a database of this many short sequences")
    parser.add_argument("--row-bytes", type=int, help="with --rows: bytes per row (default: bench_scale's)")
    parser.add_argument("--index-kind", help="with --rows: an explicit index kind instead of the default rule")
    parser.add_argument("--synthetic", action="store_true",
                        help="with --rows: synthetic rows of the default size through the real store and indexes "
                             "(tools/benchmarks/synthetic_rows.py)")
    args = parser.parse_args()
    if args.rows and args.synthetic:
        from tools.benchmarks.synthetic_rows import synthetic_scale

        return synthetic_scale(args.rows, args.workdir if args.workdir != parser.get_default("workdir") else None,
                               args.row_bytes)
    if args.rows:
        from tools.benchmarks.bench_scale import scale

        return scale(args.rows, args.workdir if args.workdir != parser.get_default("workdir") else None,
                     args.row_bytes, args.index_kind)
    if args.wide:
        return wide(args.wide, args.copies, args.workdir)

    from attribdb import api
    from attribdb.query.engine import QueryEngine
    from attribdb.query.options import Query
    from attribdb.runtime import Runtime

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus, args.docs, seed=2)
    model = args.model or make_model(work / "model", english_paragraphs(), layers=2, width=64, vocab=2048,
                                     positions=128)
    db = work / "db"
    api.build(db, str(corpus), str(model), **SETTINGS)  # resumes or returns at once when already built
    info = api.open(db).info()
    if info["sequences"] < 20_000:
        print(f"warning: only {info['sequences']} sequences; pass a larger --docs", file=sys.stderr)

    queries = make_queries()
    rss_start = current_rss_mib()
    runtime = Runtime.load(db)
    rss_model = current_rss_mib()
    shard_ids = runtime.manifest.shard_ids
    items = [Query(**q) for q in queries]
    quarter = QueryEngine(runtime, shard_ids=shard_ids[: max(1, len(shard_ids) // 4)])
    small = time_index(quarter, items, "quarter")
    engine = QueryEngine(runtime)
    rss_loaded = current_rss_mib()
    full = time_index(engine, items, "full")
    floor = floor_seconds(runtime, queries)
    small = against_truth(quarter, items, small, "quarter")
    quarter.close()
    full = against_truth(engine, items, full, "full")
    rss_after = current_rss_mib()

    print(f"database: {full['rows']} sequences ({distinct_sequences(engine)} distinct) in {len(shard_ids)} shards, "
          f"{info['bytes']['total'] / 2**20:.0f} MiB; "
          f"{N_QUERIES} queries of {queries[0]['prompt']!r}-like text")
    for label, f in (("quarter", small), ("full", full)):
        print(f"{label:>7} ({f['rows']:>6} rows): index p50 {1000 * f['p50']:.1f} ms, p95 {1000 * f['p95']:.1f} ms; "
              f"exhaustive {f['exhaustive']:.1f} s for the batch; ratio exhaustive/index p50 "
              f"{f['exhaustive'] / f['p50']:.0f}x (first pass over the rows p50 {1000 * f['p50_first']:.1f} ms); "
              f"recall@10 {f['recall10']:.3f}, recall@100 {f['recall100']:.3f}; "
              f"exact mode (every candidate recomputed) p50 {1000 * f['exact_p50']:.1f} ms, "
              f"recall@10 {f['exact_recall10']:.3f}")
    print(f"floor (one forward+backward of a query): {1000 * floor:.1f} ms; index p50 / floor: "
          f"{full['p50'] / floor:.1f}")
    print(f"memory after the index queries: {small['rss_index']:.0f} MiB with {small['rows']} rows "
          f"(FAISS {small['faiss_mib']:.0f} MiB), {full['rss_index']:.0f} MiB with {full['rows']} rows "
          f"(FAISS {full['faiss_mib']:.0f} MiB): grew {full['rss_index'] - small['rss_index']:.0f} MiB for "
          f"{full['faiss_mib'] - small['faiss_mib']:.0f} MiB more FAISS index")
    print(f"query process memory: {rss_start:.0f} MiB before loading, {rss_model:.0f} MiB with the model, "
          f"{rss_loaded:.0f} MiB with every shard open, {rss_after:.0f} MiB after all modes (peak "
          f"{peak_rss_mib():.0f} MiB, exhaustive included); FAISS indexes {full['faiss_mib']:.0f} MiB on disk "
          "(memory-mapped)")
    print("ratio exhaustive/index grows "
          f"{full['exhaustive'] / full['p50'] / (small['exhaustive'] / small['p50']):.2f}x "
          f"from {small['rows']} to {full['rows']} rows; recall@10 {full['recall10']:.3f}")


def wide(source: Path, copies: int, work: Path) -> None:
    """Index latency on a wide model: ``source``'s shards copied ``copies`` times."""
    import dataclasses
    import json
    import shutil

    from attribdb import layout
    from attribdb.manifest import Manifest
    from attribdb.query.engine import QueryEngine
    from attribdb.query.options import Query
    from attribdb.runtime import Runtime

    db = work / f"wide-{copies}"
    if not (db / layout.MANIFEST).exists():
        shutil.rmtree(db, ignore_errors=True)
        shutil.copytree(source / layout.FACTORS_DIR, db / layout.FACTORS_DIR)
        manifest = Manifest.load(source)
        template = manifest.generations[0]
        for copy in range(copies):
            for shard_id in template.shard_ids:
                target = layout.shard_dir(db, copy * len(template.shard_ids) + shard_id)
                shutil.copytree(layout.shard_dir(source, shard_id), target)
        template.shards *= copies
        template.sequences *= copies
        if template.sequences // copies < manifest.settings.shard_size:  # one part-filled shard, copied:
            # the copy says its shards are that size (read only: commit units matter to writers alone)
            manifest.settings = dataclasses.replace(manifest.settings, shard_size=template.sequences // copies,
                                                    commit_rows=1)
        manifest.save(db)
    rss_start = current_rss_mib()
    runtime = Runtime.load(db)
    rss_model = current_rss_mib()
    engine = QueryEngine(runtime)
    items = [Query(**q) for q in make_queries()]
    timed = time_index(engine, items, "wide")
    floor = floor_seconds(runtime, make_queries())
    shape = {m.name.split(".")[-1] for m in runtime.manifest.modules}
    print(f"wide model ({len(runtime.manifest.modules)} modules: {', '.join(sorted(shape))}), {engine.rows} rows "
          f"({engine.rows // copies} distinct) of {runtime.row_layout.bytes_per_row / 1024:.1f} KiB")
    print(f"index p50 {1000 * timed['p50']:.0f} ms, p95 {1000 * timed['p95']:.0f} ms; one forward+backward of the "
          f"query {1000 * floor:.0f} ms: ratio {timed['p50'] / floor:.2f}  (goal <= 3)")
    settings = {k: v for k, v in runtime.manifest.settings.to_dict().items() if k in ("row_bytes", "index_kind")}
    print(f"query process memory: {rss_start:.0f} MiB before, {rss_model:.0f} MiB with model and row projections, "
          f"{timed['rss_index']:.0f} MiB after the queries (FAISS {timed['faiss_mib']:.0f} MiB on disk, mapped); "
          f"settings {json.dumps(settings)}")


if __name__ == "__main__":
    main()
