"""What the full-text index costs and how fast its query modes answer, on a database of 10⁵ rows.

Builds (or reuses, resuming an interrupted build) a database of about ``--rows`` sequences of
real English text (sentences of the Python documentation shipped with the standard library) for
a tiny random-init GPT-2 (2 layers, width 64, a 2,048-token BPE vocabulary; 64-token rows of
``--row-bytes`` 2,048): the text index does not depend on the model, and a tiny one keeps the
build to minutes on two cores.  Then prints:

- the database build time, and the text index's part of it: every shard's text index rebuilt
  from its rows' LMDB text, as the seal builds it, timed, as a share of the whole build;
- the text index's size on disk, per row and as a share of the database;
- p50 / p95 of ``--mode text`` (BM25 alone) and of ``--prefilter bm25:100`` (the BM25 top 100
  recomputed in full), against ``--mode index`` measured in the same run.

With ``--tantivy`` it also indexes the same rows' text in one tantivy index and in one FTS5 file
(``pip install tantivy``; not a dependency of attribdb) and prints build time, size and the p50 of
a BM25 top 100 for each, and for attribdb's BM25 over the shards: the measurement behind the
choice of SQLite FTS5 (attribdb/text_index.py).

Run: python -m tools.benchmarks.bench_text [--rows 100000] [--workdir /tmp/attribdb-bench-text] [--tantivy]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from tools.benchutil import english_paragraphs, english_sentences, make_model

MAX_LENGTH = 64
N_QUERIES = 20
PREFILTER = 100


def write_rows_corpus(path: Path, tokenizer, rows: int, seed: int = 0) -> None:
    """Documents of 3–12 random sentences, until their windows of MAX_LENGTH tokens number ``rows``."""
    import json

    rng, sentences, total, i = random.Random(seed), english_sentences(), 0, 0
    with open(path, "w") as handle:
        while total < rows:
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 12)))
            total += -(-len(tokenizer(text)["input_ids"]) // MAX_LENGTH)
            handle.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            i += 1


def build(workdir: Path, rows: int, row_bytes: int) -> tuple[Path, float]:
    """The database and the seconds its build took (fit included; None when it was reused whole)."""
    from transformers import AutoTokenizer

    import attribdb

    model = make_model(workdir / "model", english_paragraphs(), layers=2, width=64, vocab=2048,
                       positions=MAX_LENGTH)
    corpus, db, timing = workdir / f"corpus-{rows}.jsonl", workdir / f"db-{rows}-{row_bytes}", workdir / "build-seconds"
    if not corpus.exists():
        write_rows_corpus(corpus, AutoTokenizer.from_pretrained(model), rows)
    if timing.exists() and db.exists():
        return db, float(timing.read_text())
    started = time.perf_counter()
    attribdb.build(db, corpus=str(corpus), model=str(model), max_length=MAX_LENGTH, batch_size=32,
                   shard_size=4096, commit_rows=64, fit_sample_size=256, row_bytes=row_bytes)
    seconds = time.perf_counter() - started
    timing.write_text(str(seconds))  # a resumed build's time would not be the whole build's
    return db, seconds


def text_index_seconds(db: Path) -> float:
    """Every shard's text index rebuilt from its rows' LMDB text, as the seal does."""
    from attribdb import layout, text_index
    from attribdb.inspection import existing_shards
    from attribdb.manifest import Manifest
    from attribdb.shard import ShardReader, row_texts

    manifest = Manifest.load(db)
    total = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for shard_id, path in existing_shards(db, manifest):
            reader = ShardReader(path, manifest.row_layout())
            started = time.perf_counter()
            text_index.write(row_texts(reader.env, reader.dbs[layout.ROWS_DB], str(path), reader.rows),
                             Path(scratch) / f"{shard_id}.sqlite")
            total += time.perf_counter() - started
            reader.close()
    return total


def queries(seed: int = 1) -> list[dict]:
    """A sentence's first eight words as the prompt, its next six as the completion."""
    long_enough = [s.split() for s in english_sentences() if len(s.split()) >= 14]
    return [{"prompt": " ".join(w[:8]), "completion": " " + " ".join(w[8:14])}
            for w in random.Random(seed).sample(long_enough, N_QUERIES)]


def latencies(answer, items) -> tuple[float, float]:
    """p50 and p95 in ms of ``answer(item)``, after one warm-up call."""
    answer(items[0])
    times = []
    for item in items:
        started = time.perf_counter()
        answer(item)
        times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def compare_engines(database, items, workdir: Path) -> None:
    """Build time, size and BM25 top-100 p50 of one FTS5 file, one tantivy index, and attribdb's
    per-shard FTS5 with summed statistics, over the same rows' text and the same query terms."""
    import shutil
    import sqlite3

    import tantivy

    from attribdb import text_index

    search = database.text_search
    texts = [text_index.valid_text(m["text"]) for reader in search.readers.values()
             for m in reader.metadata(range(reader.rows))]
    terms = [search.terms(f"{q['prompt']} {q['completion']}") for q in items]
    fts5_file = workdir / "compare.sqlite"
    fts5_file.unlink(missing_ok=True)
    started = time.perf_counter()
    text_index.write(enumerate(texts), fts5_file)
    fts5_build = time.perf_counter() - started
    fts5 = sqlite3.connect(fts5_file)
    fts5_query = (f"SELECT rowid FROM {text_index.TABLE} WHERE {text_index.TABLE} MATCH ? ORDER BY rank LIMIT 100")

    folder = workdir / "compare.tantivy"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", stored=False)
    builder.add_integer_field("row", stored=True)
    schema = builder.build()
    started = time.perf_counter()
    index = tantivy.Index(schema, path=str(folder))
    writer = index.writer(heap_size=256 << 20, num_threads=1)
    for row, text in enumerate(texts):
        writer.add_document(tantivy.Document(row=row, body=text))
    writer.commit()
    writer.wait_merging_threads()
    tantivy_build = time.perf_counter() - started
    index.reload()
    searcher = index.searcher()

    def tantivy_top(words):
        should = [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "body", w)) for w in words]
        return searcher.search(tantivy.Query.boolean_query(should), 100).hits

    engines = {
        "FTS5, one file": (fts5_build, fts5_file.stat().st_size,
                           lambda w: fts5.execute(fts5_query, (" OR ".join(f'"{t}"' for t in w),)).fetchall()),
        "tantivy, one index": (tantivy_build, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                               tantivy_top),
        "attribdb: FTS5 per shard, summed statistics": (
            None, database.info()["bytes"]["text"], lambda w: text_index.bm25_top(search.indexes, w, 100))}
    print(f"{len(texts)} rows' text; BM25 top 100 of {len(items)} queries (p50):")
    for name, (build_seconds, size, top) in engines.items():
        p50, _ = latencies(top, terms)
        built = "" if build_seconds is None else f"build {build_seconds:.1f} s, "
        print(f"  {name}: {built}{size / 2**20:.1f} MiB, query p50 {p50:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--row-bytes", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-bench-text"))
    parser.add_argument("--tantivy", action="store_true", help="also compare with tantivy (pip install tantivy)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import attribdb

    db, build_seconds = build(args.workdir, args.rows, args.row_bytes)
    text_seconds = text_index_seconds(db)
    database = attribdb.open(db)
    info = database.info()
    items = queries()
    text = latencies(lambda q: database.text(q["prompt"], q["completion"], k=10), items)
    prefilter = latencies(lambda q: database.prefilter(q["prompt"], q["completion"], n=PREFILTER, k=10), items)
    index = latencies(lambda q: database.query(q["prompt"], q["completion"], k=10), items)
    if args.tantivy:
        compare_engines(database, items, args.workdir)
    rows, sizes = info["sequences"], info["bytes"]
    print(f"database: {rows} rows in {info['shards']} shards, tiny GPT-2 (2×64), {MAX_LENGTH}-token rows of "
          f"{args.row_bytes} bytes; {sizes['total'] / 2**20:.0f} MiB")
    print(f"build {build_seconds:.0f} s (fit included); text indexes {text_seconds:.1f} s of it: "
          f"{text_seconds / build_seconds:.2%}")
    print(f"text index on disk {sizes['text'] / 2**20:.1f} MiB = {sizes['text'] / rows:.0f} bytes per row, "
          f"{sizes['text'] / sizes['total']:.2%} of the database (rows' text in LMDB: not stored again)")
    print(f"--mode index p50 {index[0]:.1f} ms, p95 {index[1]:.1f} ms (baseline)")
    print(f"--mode text p50 {text[0]:.1f} ms, p95 {text[1]:.1f} ms: {text[0] / index[0]:.2f}× index")
    print(f"--prefilter bm25:{PREFILTER} p50 {prefilter[0]:.1f} ms, p95 {prefilter[1]:.1f} ms: "
          f"{prefilter[0] / index[0]:.2f}× index")
    database.close()


if __name__ == "__main__":
    main()
