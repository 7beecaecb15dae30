"""Scale: index latency, recall, memory and disk of a database of N short sequences.

Run through ``python -m tools.benchmarks.bench_query --rows N``.  The database is a real
one, built by ``attribdb.build`` from a JSONL corpus on a tiny random GPT-2
(1 layer, 32 wide, a 512-token BPE vocabulary, 16-token sequences): the build
then costs little more than writing the rows, so 10⁶ rows build in well under
an hour on one thread.  Each document is a few words drawn at random from the
English of the Python docs, cut to fit one sequence, so rows are distinct and
N documents make N rows.  The database is kept under the work folder, keyed by
N and every setting, and reused by the next run.

Figures (printed last):

- p50 / p95 latency of one index query with ``rescore=0`` (query row, FAISS,
  the candidates' compressed scores from their stored rows, metadata): the
  index path itself, over queries made the same way as the documents;
- recall@10 of those answers against brute force over the stored rows: the
  exact inner product of the query row with every stored unit row, read back
  from the row store in bounded memory (a shard at a time).  That is the truth
  the index approximates; compression loss is a property of the row, not of
  the index (docs/evidence.md, tools/evaluations/eval_rows.py);
- with ``--exhaustive Q`` (default: on a few queries up to 2·10⁴ rows) also
  recall@10 against the full-space exhaustive mode;
- resident memory of the query process, the database's size on disk and the
  build time (measured when the database was built, kept beside it).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tools.benchutil import english_paragraphs, make_model, recall

MODEL = {"layers": 1, "width": 32, "vocab": 512, "positions": 32}
# 1 KiB all-in per row (about 300 float16 coordinates, their codes and metadata): wide enough that search is
# not trivially cheap
SETTINGS = {"max_length": 16, "batch_size": 256, "shard_size": 4096, "commit_rows": 256, "fit_sample_size": 512,
            "row_bytes": 1024}
WORDS_PER_DOC = 7
N_QUERIES = 200
TRUTH_K = 10
TIE = 1e-4  # cosines this close to the k-th best tie: the engine sums the same float16 rows in another order


def vocabulary() -> list[str]:
    return sorted({w for p in english_paragraphs() for w in re.findall(r"[A-Za-z]+", p)})


def random_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = vocabulary()
    return [" ".join(rng.choices(vocab, k=words)) for _ in range(n)]


def fitted_texts(n: int, tokenizer, max_length: int, seed: int) -> list[str]:
    """``n`` texts of random words, at most ``max_length`` tokens each.  The tokenizer splits on
    spaces before BPE, so a text's length is the sum of its words' lengths."""
    vocab = vocabulary()
    lengths = dict(zip(vocab, map(len, tokenizer([" " + w for w in vocab], add_special_tokens=False)["input_ids"])))
    out = []
    for text in random_texts(n, WORDS_PER_DOC, seed):
        words, used = [], 1  # the first word has no leading space: a token to spare
        for word in text.split():
            if used + lengths[word] <= max_length:
                words.append(word)
                used += lengths[word]
        out.append(" ".join(words))
    return out


def write_corpus(path: Path, n: int, tokenizer, max_length: int) -> None:
    """``n`` documents of one sequence each."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for i, text in enumerate(fitted_texts(n, tokenizer, max_length, seed=0)):
            handle.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    tmp.replace(path)


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mib(path: Path) -> float:
    """Blocks allocated, not file lengths: a small file occupies a whole block."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*")) / 2 ** 20


def build(work: Path, n: int, settings: dict) -> Path:
    """The database of ``n`` rows for ``settings``: built, resumed, or (when finished) only brought
    up to date with its database index.  The timing of the run that computed the rows is kept
    beside it, in wall-clock and CPU seconds (other work on the machine slows the first)."""
    from transformers import AutoTokenizer

    from attribdb import api

    model = make_model(work / "model-{layers}x{width}-v{vocab}".format(**MODEL), english_paragraphs(), **MODEL)
    key = hashlib.sha256(json.dumps([n, MODEL, settings], sort_keys=True).encode()).hexdigest()[:10]
    db = work / f"db-{n}-{key}"
    corpus = work / f"corpus-{n}.jsonl"
    if not corpus.exists():
        write_corpus(corpus, n, AutoTokenizer.from_pretrained(model), settings["max_length"])
    started, cpu = time.perf_counter(), time.process_time()
    result = api.build(db, str(corpus), str(model), **settings)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    timing = db.with_name(db.name + ".build.json")
    if result.sequences_computed or not timing.exists():
        timing.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "computed": result.sequences_computed,
                                      "rows_per_second": result.sequences_computed / seconds,
                                      "rows_per_cpu_second": result.sequences_computed / cpu}))
    return db


def queries(n: int, tokenizer, max_length: int):
    """Texts made like the documents (other seed), split into a prompt and a completion."""
    from attribdb.query.options import Query

    out = []
    for text in fitted_texts(n, tokenizer, max_length, seed=1):
        words = text.split()
        cut = max(1, len(words) // 2)
        out.append(Query(" ".join(words[:cut]), " " + " ".join(words[cut:] or ["the"])))
    return out


def timed_queries(engine, items, warm_up) -> tuple[list[float], list, dict[str, list[float]]]:
    """Index queries with ``rescore=0`` one at a time, after ``warm_up`` untimed ones (first reads of the
    index and code paths): (seconds per query, answers, each lap's milliseconds per query)."""
    from attribdb.query.options import QueryOptions

    options = QueryOptions(k=TRUTH_K, rescore=0)
    for item in warm_up:
        list(engine.query([item], options))
    latencies, answers, laps = [], [], {}
    for item in items:
        started = time.perf_counter()
        answers += engine.query([item], options)
        latencies.append(time.perf_counter() - started)
        for lap, ms in answers[-1].timings_ms.items():
            laps.setdefault(lap, []).append(ms)
    return latencies, answers, laps


def stored_keys(engine, solved, reader, rows: np.ndarray) -> np.ndarray:
    """(Q, len(rows)) the default ranking's key (the cosine form of the stored-row score) of these
    rows of one shard for every solved query, scored from their payloads."""
    from attribdb import layout

    return payload_keys(engine, solved, reader.read(layout.ROWS, rows), reader.whole(layout.SELF_INFLUENCE)[rows])


def payload_keys(engine, solved, payloads: np.ndarray, self_influence: np.ndarray) -> np.ndarray:
    """(Q, len(payloads)) the default ranking's key of rows given as payloads and self-influences."""
    from attribdb.rows import module_scores

    scores = module_scores(engine.runtime.row_layout, solved.blocks, payloads).sum(-1)
    norms = np.sqrt(np.outer(solved.row_self, self_influence))
    return scores.double().cpu().numpy() / np.maximum(norms, 1e-300)


def brute_force_scores_top(engine, solved, k: int) -> np.ndarray:
    """(Q, k) the ``k`` largest keys of each query over every stored row, best first: every row read
    back from the row store and scored, a block at a time (bounded memory)."""
    best = np.full((len(solved.row_self), k), -np.inf)
    for reader in engine.store.shards.values():
        for start in range(0, reader.rows, 1024):
            keys = stored_keys(engine, solved, reader, np.arange(start, min(start + 1024, reader.rows)))
            best = -np.sort(-np.concatenate([best, keys], axis=1), axis=1)[:, :k]
    return best


def recall_at(engine, answers, solved, truth: np.ndarray) -> float:
    """Share of each answer's hits whose key is at least the k-th best by brute force: a hit that
    ties the k-th best counts (identical rows tie, and either one is a right answer)."""
    k = truth.shape[1]
    found = []
    for i, answer in enumerate(answers):
        keys = [stored_keys(engine, solved, engine.store.shards[h.shard], np.array([h.row]))[i, 0]
                for h in answer.hits[:k]]
        found.append(np.sum(np.array(keys) >= truth[i, -1] - TIE) / k)
    return float(np.mean(found))


def scale(n: int, work: Path | None, row_bytes: int | None, index_kind: str | None,
          exhaustive: int | None = None) -> None:
    from attribdb.query.engine import QueryEngine
    from attribdb.query.options import QueryOptions
    from attribdb.runtime import Runtime

    work = work or Path("/tmp/attribdb-bench-rows")
    work.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS | ({"row_bytes": row_bytes} if row_bytes else {}) | (
        {"index_kind": index_kind} if index_kind else {})
    db = build(work, n, settings)
    built = json.loads(db.with_name(db.name + ".build.json").read_text())

    rss_start = current_rss_mib()
    runtime = Runtime.load(db)
    started = time.perf_counter()
    engine = QueryEngine(runtime)
    open_seconds = time.perf_counter() - started
    rss_open = current_rss_mib()
    items = queries(N_QUERIES, runtime.tokenizer, SETTINGS['max_length'] - 2)
    latencies, answers, laps = timed_queries(engine, items, items[:20])
    rss_queried = current_rss_mib()
    solved = engine.pipeline.gradients.solve(items)
    started = time.perf_counter()
    truth = brute_force_scores_top(engine, solved, TRUTH_K)
    brute_seconds = time.perf_counter() - started
    index_recall = recall_at(engine, answers, solved, truth)
    exhaustive = (5 if engine.rows <= 20_000 else 0) if exhaustive is None else exhaustive
    full_space = None
    if exhaustive:
        truth_full = engine.exhaustive(items[:exhaustive], QueryOptions(k=TRUTH_K))["normalized"]
        full_space = recall(answers[:exhaustive], truth_full, TRUTH_K)
    ordered = sorted(latencies)
    kinds = f"{runtime.manifest.settings.index_kind}: {engine.store.indexes.kinds}"
    print("laps (median ms): " + ", ".join(f"{lap} {statistics.median(v):.2f}" for lap, v in laps.items()),
          file=sys.stderr)
    print(f"query process RSS: {rss_start:.0f} MiB before loading, {rss_open:.0f} MiB with every shard open "
          f"(opened in {open_seconds:.1f} s), {rss_queried:.0f} MiB after {len(items) + 20} queries", flush=True)
    print(f"{len(items)} queries: index p50 {1000 * statistics.median(ordered):.1f} ms, "
          f"p95 {1000 * ordered[int(0.95 * (len(ordered) - 1))]:.1f} ms (goal p50 <= 50 ms); "
          f"recall@10 against brute force over the stored rows {index_recall:.3f} (goal >= 0.99; "
          f"brute force {brute_seconds:.1f} s for the batch)"
          + (f"; recall@10 against full-space exhaustive on {exhaustive} queries {full_space:.3f}"
             if full_space is not None else ""), flush=True)
    # last: walking a large database's files for their blocks can take many minutes on a cold cache
    print(f"database {db}: {engine.rows} rows in {len(engine.store.shards)} shards, rows of "
          f"{runtime.row_layout.bytes_per_row} bytes, index {kinds}; "
          f"disk {disk_mib(db):.0f} MiB in {sum(1 for p in db.rglob('*') if p.is_file())} files; "
          f"built in {built['seconds']:.0f} s, "
          f"{built.get('cpu_seconds', float('nan')):.0f} CPU s ({built['rows_per_second']:.0f} rows/s, "
          f"{built.get('rows_per_cpu_second', float('nan')):.0f} rows per CPU second, "
          f"1 thread; {built['computed']} rows computed in that run)")
