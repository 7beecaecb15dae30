"""Scale at the default row size: N synthetic rows written through the real store and indexes, opened and
queried in one process.

Run through ``python -m tools.benchmarks.bench_query --rows N --synthetic [--row-bytes B]``.
Computing 10⁶ rows of the default size from a model would take days on one core; the store, the
database index and the query path do not care where a row came from.  So the database is real up
to its rows: a 2×64 GPT-2 (random init, wide enough for a row of the default size) is fitted on a
few hundred documents of English and builds them (a real database, whose rows are drawn from
below); the synthetic database gets its factors, manifest and row layout.  Then N rows are
written by the build's own ShardWriter in commit units (each with an LMDB record like a real one),
shards are sealed, and the database index is brought up to date as the end of a build does.  A
synthetic row is a real row of that database drawn at random (seeded by its place): rows with the
structure of real ones, repeated, so identical rows tie.  Writing can be interrupted and resumed.
Figures: p50/p95 of one index query with ``rescore=0``, RSS after opening and after querying, disk and
file count, and recall@10 against the exact top 10 of every stored row, which the few thousand real
rows give at once (every stored row is a copy of one, and the copies are known by their seeds).  Each
real row is repeated n / (real rows) times: where that is above the candidates a query scores, the
candidates are copies of one or two rows, and recall@10 says only whether the codes put the best real
row first; it is printed for 4x and 8x the default candidates as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tools.benchmarks.bench_scale import (
    TRUTH_K,
    current_rss_mib,
    disk_mib,
    payload_keys,
    queries,
    recall_at,
    timed_queries,
)
from tools.benchutil import english_paragraphs, make_model, write_corpus

MODEL = {"layers": 2, "width": 64, "vocab": 512, "positions": 64}
SETTINGS = {"max_length": 64, "batch_size": 16, "shard_size": 4096, "commit_rows": 64, "fit_sample_size": 256}
FIT_DOCS = 512
N_QUERIES = 100
TRUTH_QUERIES = 40


def _fitted(work: Path, n: int, row_bytes: int) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """The database folder for ``n`` rows, fitted, and real rows (payloads, self-influence) to draw
    from: a real database of a small English corpus is built (its fit and its rows), and the new one
    gets its factors and manifest without its rows."""
    from attribdb import api, layout
    from attribdb.manifest import Manifest, exists
    from attribdb.shard import ShardReader

    model = make_model(work / "model-{layers}x{width}-v{vocab}".format(**MODEL), english_paragraphs(), **MODEL)
    key = hashlib.sha256(json.dumps([row_bytes, MODEL, SETTINGS], sort_keys=True).encode()).hexdigest()[:10]
    profile = work / f"profile-{key}"
    api.build(profile, str(write_corpus(work / "fit-corpus.jsonl", FIT_DOCS, seed=3)), str(model), quiet=True,
              row_bytes=row_bytes, **SETTINGS)  # returns at once once built
    manifest = Manifest.load(profile)
    payloads, self_influence = [], []
    for shard_id in manifest.shard_ids:
        reader = ShardReader(layout.shard_dir(profile, shard_id), manifest.row_layout())
        payloads.append(reader.read(layout.ROWS))
        self_influence.append(reader.read(layout.SELF_INFLUENCE))
        reader.close()
    real = (np.concatenate(payloads), np.concatenate(self_influence))
    db = work / f"synthetic-{n}-{key}"
    if not exists(db):
        shutil.copytree(profile / layout.FACTORS_DIR, db / layout.FACTORS_DIR)
        manifest.generations, manifest.database_index = [], None
        manifest.save(db)
    return db, real


def _block(start: int, rows: int, real: tuple[np.ndarray, np.ndarray]) -> "RowBlock":  # noqa: F821 - shard.RowBlock
    """Rows ``start..start+rows``: real rows drawn at random (seeded by their place); and their metadata."""
    from attribdb.records import RowRecord
    from attribdb.shard import RowBlock

    drawn = _drawn(start, rows, len(real[0]))
    metadata = [RowRecord(f"s{start + i}", "synthetic", (0, 2), (0, 9), f"row {start + i}", (1, 2), start + i)
                for i in range(rows)]
    return RowBlock(real[0][drawn], real[1][drawn], metadata)


def _drawn(start: int, rows: int, real_rows: int) -> np.ndarray:
    """Which real row each of rows ``start..start+rows`` copies."""
    return np.random.default_rng(start).integers(0, real_rows, rows)


def _units(n: int, shard_id: int) -> list[tuple[int, int]]:
    """(first row within the shard, rows) of each commit unit of shard ``shard_id`` of ``n`` rows: the
    blocks the database is written in, whose first global row seeds which real rows they copy."""
    capacity = min(SETTINGS["shard_size"], n - shard_id * SETTINGS["shard_size"])
    return [(start, min(SETTINGS["commit_rows"], capacity - start))
            for start in range(0, capacity, SETTINGS["commit_rows"])]


def copies(n: int, real_rows: int) -> np.ndarray:
    """How many of the ``n`` synthetic rows copy each real row, from the blocks they are written in."""
    counts = np.zeros(real_rows, dtype=np.int64)
    for shard_id in range(math.ceil(n / SETTINGS["shard_size"])):
        for start, rows in _units(n, shard_id):
            first = shard_id * SETTINGS["shard_size"] + start
            counts += np.bincount(_drawn(first, rows, real_rows), minlength=real_rows)
    return counts


def exact_top(keys: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) the k largest keys over every stored row, from each real row's key and its copies."""
    order = np.argsort(-keys, axis=1)
    return np.stack([np.repeat(row[o], counts[o].clip(max=k))[:k] for row, o in zip(keys, order)])


def synthetic_database(work: Path, n: int, row_bytes: int) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """The database of ``n`` synthetic rows: fitted, its rows written (or resumed) and sealed, its
    database index up to date; and the real rows it copies (payloads, self-influences)."""
    from attribdb import db_index, layout
    from attribdb.indexer.writing import writing
    from attribdb.manifest import Generation, Manifest
    from attribdb.rows import RowProjection
    from attribdb.shard import ShardReader, ShardWriter

    db, real = _fitted(work, n, row_bytes)
    with writing(db):
        manifest = Manifest.load(db)
        settings, row_layout = manifest.settings, manifest.row_layout()
        if not manifest.generations:
            manifest.generations.append(Generation(corpus={"path": f"synthetic:{n}"}, first_shard=0,
                                                   shards=math.ceil(n / settings.shard_size), sequences=n,
                                                   documents=n))
            manifest.save(db)
        started = time.perf_counter()
        for shard_id in manifest.generations[0].shard_ids:
            first, units = shard_id * settings.shard_size, _units(n, shard_id)
            writer = ShardWriter(layout.shard_dir(db, shard_id), row_layout, sum(r for _, r in units),
                                 settings.commit_rows)
            try:
                for start, rows in units:
                    if not writer.sealed and start >= writer.committed:
                        writer.append(_block(first + start, rows, real), start)
                if not writer.sealed:
                    writer.seal()
            finally:
                writer.close()
        written = time.perf_counter() - started
        started = time.perf_counter()
        readers = {s: ShardReader(layout.shard_dir(db, s), row_layout) for s in manifest.shard_ids}
        try:
            db_index.update(db, manifest, readers, RowProjection.load(layout.projection_path(db), row_layout))
        finally:
            for reader in readers.values():
                reader.close()
        indexed = time.perf_counter() - started
        manifest = Manifest.load(db)
        manifest.generations[0].state = "complete"
        manifest.save(db)
    print(f"rows written in {written:.0f} s, database index in {indexed:.0f} s (0 when already done)", file=sys.stderr)
    return db, real


def synthetic_scale(n: int, work: Path | None, row_bytes: int | None) -> None:
    from attribdb.inspection import database_info
    from attribdb.query.engine import QueryEngine
    from attribdb.query.options import DEFAULT_CANDIDATES, QueryOptions
    from attribdb.runtime import Runtime

    work = work or Path("/tmp/attribdb-bench-synthetic")
    work.mkdir(parents=True, exist_ok=True)
    db, real = synthetic_database(work, n, row_bytes or 32768)
    rss_start = current_rss_mib()
    started = time.perf_counter()
    runtime = Runtime.load(db)
    engine = QueryEngine(runtime)
    open_seconds = time.perf_counter() - started
    rss_open = current_rss_mib()
    items = queries(N_QUERIES + 10, runtime.tokenizer, SETTINGS["max_length"] - 2)
    latencies, answers, laps = timed_queries(engine, items[:N_QUERIES], items[N_QUERIES:])
    rss_queried = current_rss_mib()
    info = database_info(db)
    ordered = sorted(latencies)
    print("laps (median ms): " + ", ".join(f"{lap} {statistics.median(v):.1f}" for lap, v in laps.items()),
          file=sys.stderr)
    print(f"{engine.rows} synthetic rows of {runtime.row_layout.bytes_per_row} bytes, "
          f"{info['row']['all_in']['total']} bytes all-in; index {engine.store.indexes.kinds}")
    print(f"query process RSS: {rss_start:.0f} MiB before, {rss_open:.0f} MiB with the database open "
          f"({open_seconds:.1f} s), {rss_queried:.0f} MiB after {len(items)} queries")
    print(f"{N_QUERIES} queries, rescore=0: p50 {1000 * statistics.median(ordered):.0f} ms, "
          f"p95 {1000 * ordered[int(0.95 * (len(ordered) - 1))]:.0f} ms")
    print(f"database {db}: disk {disk_mib(db) / 1024:.1f} GiB in {info['files']} files "
          f"({info['bytes_per_sequence']['zarr']:.0f} B per row in Zarr, {info['bytes_per_sequence']['faiss']:.0f} "
          f"in FAISS, {info['bytes_per_sequence']['lmdb']:.0f} in LMDB, {info['bytes_per_sequence']['text']:.0f} in "
          "text.sqlite)")
    checked = items[:TRUTH_QUERIES]
    solved = engine.pipeline.gradients.solve(checked)
    truth = exact_top(payload_keys(engine, solved, *real), copies(n, len(real[0])), TRUTH_K)
    found = {DEFAULT_CANDIDATES: recall_at(engine, answers[:TRUTH_QUERIES], solved, truth)}
    for candidates in (4 * DEFAULT_CANDIDATES, 8 * DEFAULT_CANDIDATES):
        wider = [a for item in checked for a in engine.query([item], QueryOptions(k=TRUTH_K, rescore=0,
                                                                                  candidates=candidates))]
        found[candidates] = recall_at(engine, wider, solved, truth)
    print(f"recall@10 against the exact top 10 of every stored row ({len(checked)} queries; {len(real[0])} real rows, "
          f"each stored {n / len(real[0]):.0f} times on average), by candidates per end: "
          + ", ".join(f"{recall:.3f} with {candidates}" for candidates, recall in found.items()))
