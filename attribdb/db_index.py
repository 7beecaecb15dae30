"""Candidate search: one FAISS index of compact codes over the database's rows, refined from the row store.

FAISS holds no copy of a row.  The database index (kind ``pq4``) finds candidates in up to
three steps, each more exact on fewer rows:

1. a 4-bit product-quantization fast-scan over every row keeps its best rows: one sub-quantizer
   per coordinate up to :data:`MAX_SUB_QUANTIZERS` coordinates (4 bits each), per 2, 4, 8 ...
   beyond (:func:`scan_dims`: half a bit per coordinate at GPT-2-small's 16k);
2. where that is a bit per coordinate or less, RaBitQ codes of :data:`FINE_BITS` bits per
   coordinate re-rank the fast-scan's best :func:`first_stage` rows (FAISS's ``IndexRefine``);
3. the best :data:`REFINE_ROWS` times the candidates asked for are read from the row store and
   scored exactly: the candidates are the rows with the best inner products with the query row,
   with the scores brute force would give.

Why (measured with kron rows of 16,203 coordinates from the trained demo model on 26,279 windows
of English, 400 query ends, one thread): fast-scan is the only code FAISS scans fast (80-180 ns
per row), but its look-up tables lose their precision past about 2,000 sub-quantizers (at 4,052
its best 1,024 held 0.80 of the true top 10), so at that width it holds half a bit per
coordinate, and its best 1,024 held only 0.970 of the true top 10; reading the ~4,000 rows per
query end that would need from the row store is slow.  A scan of every row's 2 KiB PQ code with
exact tables held 0.999 but took 10 µs per row; 1-bit RaBitQ 0.989 at 840 ns.  Fast-scan's best
8,192 re-ranked by 2-bit RaBitQ codes left the true top 10 among the best 256 (0.992).  On narrow
rows (288 coordinates of the test suite's tiny model, 19,711 rows, 200 query ends) fast-scan with
one sub-quantizer per coordinate is precise alone: its best 256 held 0.9995 of the true top 10
(with 36 sub-quantizers its best 4,096 held 0.994, and 2-bit RaBitQ's best 256 only 0.976).

Shards the database index does not cover are scanned exactly from their rows: every shard of a
database with less than :data:`AUTO_MIN_BYTES` of rows (``index_kind="auto"``) or built with
``flat``, and shards sealed since the index was last brought up to date.

Files: the index is written to a new file named by its content, and only then recorded in the
manifest (kind, file, CRC32C, shards covered, rows, rows trained on), so a reader sees either the
old index or the new one.  The file it replaces is not deleted then: a reader may have read the
manifest that names it and be about to open it.  Files no manifest names are deleted by a later
writer once retired for :data:`GRACE_SECONDS` (Lance keeps old versions for the same reason), and
a reader that still finds its file gone opens the database again from the manifest now on disk
(:func:`open_searchable`) rather than calling a healthy database damaged.  Ids are
``shard << 32 | row``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.faiss_index import read_index, write_index
from attribdb.index_kinds import AUTO, DATABASE_KINDS
from attribdb.manifest import Manifest
from attribdb.rows import index_dim
from attribdb.shard import ShardReader

KIND = DATABASE_KINDS[0]  # the database index kind, and the index_kind setting that asks for it at any size
# auto: a database index once a scan of every row would read this much: about 5,000 rows of the default
# size (a scan of them takes a few hundred ms on one core), 200,000 of bench_scale's
AUTO_MIN_BYTES = 128 << 20
MAX_SUB_QUANTIZERS = 2048  # fast-scan's look-up tables stay precise up to about this many
FINE_BITS = 2  # RaBitQ bits per coordinate of the re-ranking codes, where fast-scan has a bit or less
FIRST_STAGE_MIN = 8192  # fast-scan candidates re-ranked per query end...
FIRST_STAGE_SHARE = 32  # ...or this share of the rows, if more
REFINE_ROWS = 4  # rows read and scored exactly per candidate asked for
TRAIN_ROWS = 4096  # 256 rows per level of each 16-level sub-quantizer
RETRAIN_GROWTH = 4  # retrain once the sample a retraining would use is this many times the one it used
GRACE_SECONDS = 900  # a retired index file outlives the manifest that named it by at least this
MOVED_RETRIES = 5
SHARD_BITS = 32
SCAN_BLOCK_BYTES = 64 << 20  # float32 vectors scored at once when a shard is scanned


def wanted(index_kind: str, row_store_bytes: int) -> bool:
    """Whether a database of this index kind, holding this many bytes of rows, has a database index."""
    return index_kind == KIND or (index_kind == AUTO and row_store_bytes >= AUTO_MIN_BYTES)


def first_stage(rows: int) -> int:
    return min(rows, max(FIRST_STAGE_MIN, rows // FIRST_STAGE_SHARE))


def global_ids(shard_id: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(shard_id) << SHARD_BITS) + np.asarray(rows, dtype=np.int64)


def scan_dims(width: int) -> int:
    """Coordinates per fast-scan sub-quantizer for codes ``width`` wide (a power of two dividing it)."""
    dims = 1
    while width // dims > MAX_SUB_QUANTIZERS:
        dims *= 2
    return dims


def _empty(dim: int):
    """An untrained database index for rows of ``dim`` coordinates (padded to :func:`index_dim`)."""
    from attribdb.native import faiss

    width = index_dim(dim)
    scan = faiss.IndexPQFastScan(width, width // scan_dims(width), 4, faiss.METRIC_INNER_PRODUCT)
    scan.pq.cp.min_points_per_centroid = 1  # small databases train on few rows; faiss would warn per sub-quantizer
    scan.pq.cp.niter = 10
    if scan_dims(width) <= 2:  # 2 bits per coordinate or more: precise enough alone
        return faiss.IndexIDMap(scan)
    fine = faiss.IndexRaBitQ(width, faiss.METRIC_INNER_PRODUCT, FINE_BITS)
    fine.qb = 8  # the query quantized to 8 bits: RaBitQ's fast path, as precise as float here
    return faiss.IndexIDMap(faiss.IndexRefine(scan, fine))  # the wrappers keep their parts alive


def _stages(index):
    """(the fast-scan index, the RaBitQ index or None) of a database index, valid while it lives."""
    from attribdb.native import faiss

    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.base_index), faiss.downcast_index(inner.refine_index)
    return inner, None


def code_bytes(dim: int) -> int:
    """Bytes the database index holds per row of ``dim`` coordinates: its codes and its id."""
    index = _empty(dim)  # alive while its parts are read: they belong to it
    scan, fine = _stages(index)
    return scan.code_size + (fine.code_size if fine is not None else 0) + np.dtype(np.int64).itemsize


def _sealed(readers: dict) -> dict:
    return {s: reader for s, reader in sorted(readers.items()) if reader.sealed and reader.rows}


def _blocks(reader: ShardReader):
    """A shard's rows in blocks of about :data:`SCAN_BLOCK_BYTES` as float32 vectors."""
    size = max(1, SCAN_BLOCK_BYTES // (4 * index_dim(reader.layout.dim)))
    for start in range(0, reader.rows, size):
        rows = np.arange(start, min(start + size, reader.rows))
        yield rows, reader.faiss_vectors(rows)


def _trained(sealed: dict, total: int):
    """An empty database index trained on about :data:`TRAIN_ROWS` rows sampled evenly from every
    sealed shard (seeded: the same database trains the same index)."""
    share = min(1.0, TRAIN_ROWS / total)
    rng = np.random.default_rng(0)
    sample = [reader.faiss_vectors(np.flatnonzero(rng.random(reader.rows) < share)) for reader in sealed.values()]
    index = _empty(next(iter(sealed.values())).layout.dim)
    index.train(np.concatenate(sample))
    return index


def update(root: Path, manifest, readers: dict) -> bool:
    """Bring the database index up to date with the sealed shards in ``readers`` (shard id →
    ShardReader) when the index kind wants one; record it in the manifest.  True when it changed.
    An index trained on a sample :data:`RETRAIN_GROWTH` times smaller than the shards now offer is
    trained again, over every sealed shard."""
    sealed = _sealed(readers)
    total = sum(reader.rows for reader in sealed.values())
    row_bytes = next(iter(readers.values())).layout.bytes_per_row if readers else 0
    if not total or not wanted(manifest.settings.index_kind, total * row_bytes):
        return False
    recorded = manifest.database_index
    folder = root / layout.INDEX_DIR
    intact = recorded is not None and (folder / recorded["file"]).is_file() and \
        _file_crc32c(folder / recorded["file"]) == recorded["crc32c"]  # else rebuilt: what verify's advice promises
    retrain = not intact or min(total, TRAIN_ROWS) >= RETRAIN_GROWTH * recorded["trained_on"]
    covered = set() if retrain else set(recorded["shards"])
    todo = [s for s in sealed if s not in covered]
    if not todo:
        return False
    index = _trained(sealed, total) if retrain else read_index(folder / recorded["file"], mmap=False)
    for shard_id in todo:
        for rows, vectors in _blocks(sealed[shard_id]):
            index.add_with_ids(vectors, global_ids(shard_id, rows))
    folder.mkdir(exist_ok=True)
    made = folder / f"rows-{KIND}.new"  # named by its content once written
    write_index(index, made)
    crc = _file_crc32c(made)
    name = f"rows-{KIND}-{index.ntotal}-{crc}.faiss"
    os.replace(made, folder / name)
    if recorded and recorded["file"] != name and (folder / recorded["file"]).is_file():
        os.utime(folder / recorded["file"])  # retired now: the grace period starts (before the manifest moves on)
    manifest.database_index = {"kind": KIND, "file": name, "crc32c": crc, "shards": sorted(covered | set(todo)),
                               "rows": int(index.ntotal),
                               "trained_on": recorded["trained_on"] if not retrain else min(total, TRAIN_ROWS)}
    manifest.save(root)
    return True


def collect_retired(root: Path, manifest) -> list[str]:
    """Delete the index files no manifest has named for :data:`GRACE_SECONDS` (and leftovers of
    killed writers as old); the names deleted."""
    folder = root / layout.INDEX_DIR
    keep = (manifest.database_index or {}).get("file")
    deleted = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            if path.name != keep and time.time() - path.stat().st_mtime > GRACE_SECONDS:
                path.unlink()
                deleted.append(path.name)
        except FileNotFoundError:  # another writer's cleanup (a writer that lost the lock) got there first
            continue
    return deleted


def check_codes(index, readers: dict, covered: list[int]) -> None:
    """Raise a StoreError naming the first covered shard whose rows the database index does not
    hold, or holds codes for that their rows do not encode to (codes built from another row would
    make a row a candidate for the wrong queries; its CRC32C cannot tell)."""
    from attribdb.native import faiss

    ids = faiss.vector_to_array(index.id_map)
    order = np.argsort(ids, kind="stable")
    scan, fine = _stages(index)
    fine_codes = faiss.vector_to_array(fine.codes).reshape(index.ntotal, fine.code_size) if fine is not None else None
    for shard_id in covered:
        for rows, vectors in _blocks(readers[shard_id]):
            wanted = global_ids(shard_id, rows)
            at = order[np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)]
            same = ids[at] == wanted
            same &= np.all(scan.reconstruct_batch(at) == scan.sa_decode(scan.sa_encode(vectors)), axis=1)
            if fine is not None:
                same &= np.all(fine_codes[at] == fine.sa_encode(vectors), axis=1)
            if not same.all():
                raise StoreError(f"the database index's codes of shard {shard_id:05d} row {rows[np.argmin(same)]} "
                                 "differ from its row: the database index is damaged (delete it and run "
                                 "`attribdb build` again to rebuild it)")


def describe(recorded: dict) -> str:
    """One line on a recorded database index, for build output and ``info``."""
    return f"{recorded['rows']} rows in compact codes, candidates scored from the rows ({REFINE_ROWS}x read)"


def _file_crc32c(path: Path) -> str:
    from attribdb.shard import file_crc32c

    return file_crc32c(path).decode()


class IndexMoved(Exception):
    """The recorded database index file is gone because a writer recorded another one since."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest


class IndexSet:
    """What a query searches: the database index for the shards it covers, the rows of every other
    shard; one search merges them into (score, shard, row) lists, scores exact."""

    def __init__(self, readers: dict, database=None, recorded: dict | None = None):
        self.readers, self.database, self.recorded = readers, database, recorded
        covered = set(recorded["shards"]) if database is not None else set()
        self.scanned = {s: reader for s, reader in readers.items() if reader.rows and s not in covered}

    @classmethod
    def open(cls, root: Path, manifest, readers: dict) -> "IndexSet":
        """``readers``: shard id → ShardReader of the shards to search.  The database index is used
        when every shard it covers is among them (a query restricted to some shards scans theirs)."""
        recorded = manifest.database_index
        if recorded and set(recorded["shards"]) <= set(readers):
            return cls(readers, _open_recorded(root, recorded, readers), recorded)
        return cls(readers)

    @property
    def kinds(self) -> str:
        parts = [f"{len(self.scanned)} shards scanned from their rows"] if self.scanned else []
        if self.database is not None:
            parts.append(f"database {KIND} ({describe(self.recorded)})")
        return " + ".join(parts) or "none"

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[float, int, int]]]:
        """Per query row, the best ``k`` (score, shard, row) by exact inner product with the stored
        rows, among every scanned row and the database index's candidates."""
        queries = np.asarray(queries, dtype=np.float32)
        if self.readers:
            width = index_dim(next(iter(self.readers.values())).layout.dim)
            queries = np.ascontiguousarray(np.pad(queries, ((0, 0), (0, width - queries.shape[1]))))
        found = [[] for _ in range(len(queries))]
        for shard_id, reader in self.scanned.items():
            for rows, vectors in _blocks(reader):
                _keep_best(found, queries @ vectors.T, shard_id, rows, k)
        if self.database is not None:
            self._search_database(queries, k, found)
        return [sorted(hits, reverse=True)[:k] for hits in found]

    def _search_database(self, queries: np.ndarray, k: int, found: list) -> None:
        from attribdb.native import faiss

        pool = min(REFINE_ROWS * k, self.database.ntotal)
        if _stages(self.database)[1] is not None:
            faiss.downcast_index(self.database.index).k_factor = first_stage(self.database.ntotal) / pool
        _, ids = self.database.search(queries, pool)
        for i, row_ids in enumerate(ids):
            row_ids = np.sort(row_ids[row_ids >= 0])
            shards = row_ids >> SHARD_BITS
            for shard_id in np.unique(shards):
                rows = row_ids[shards == shard_id] & ((1 << SHARD_BITS) - 1)
                vectors = self.readers[int(shard_id)].faiss_vectors(rows)
                _keep_best(found[i:i + 1], queries[i:i + 1] @ vectors.T, int(shard_id), rows, k)


def _keep_best(found: list, scores: np.ndarray, shard_id: int, rows: np.ndarray, k: int) -> None:
    """Add each query's best ``k`` of ``scores`` (queries × rows) to its list in ``found``."""
    if scores.shape[1] > k:
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        best = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    for hits, picked, row_scores in zip(found, best, scores):
        hits += [(float(row_scores[j]), shard_id, int(rows[j])) for j in picked]


def _open_recorded(root: Path, recorded: dict, readers: dict):
    """The recorded database index, checked: its file's CRC32C and its row count against the shards.
    A file that is gone because the manifest now names another raises :class:`IndexMoved`."""
    path = root / layout.INDEX_DIR / recorded["file"]
    try:
        intact = _file_crc32c(path) == recorded["crc32c"]
        index = read_index(path) if intact else None
    except (FileNotFoundError, RuntimeError) as exc:
        current = Manifest.load(root)
        if current.database_index != recorded:
            raise IndexMoved(current) from None
        if isinstance(exc, FileNotFoundError):
            raise StoreError(f"{path} is missing: the database index is damaged (run `attribdb build` again to "
                             "rebuild it)") from None
        raise StoreError(f"{path} cannot be read: {str(exc).splitlines()[0][:120]}") from None
    if index is None:
        raise StoreError(f"{path} fails its checksum: the database index is damaged (run `attribdb build` again to "
                         "rebuild it)")
    rows = sum(readers[s].rows for s in recorded["shards"])
    if index.ntotal != recorded["rows"] or rows != recorded["rows"]:
        raise StoreError(f"{path} holds {index.ntotal} vectors, the manifest records {recorded['rows']} and its "
                         f"shards hold {rows} rows: the database index is damaged")
    return index


def open_searchable(root: Path, manifest, row_layout, shard_ids=None) -> tuple[dict, IndexSet]:
    """The shards of ``manifest`` (those in ``shard_ids``, default all) and the indexes to search
    them, opened together.  When a writer recorded a new database index, and the file named by
    ``manifest`` is already gone, everything is opened again from the manifest now on disk."""
    from attribdb.inspection import existing_shards

    for _ in range(MOVED_RETRIES):
        readers = {shard_id: ShardReader(path, row_layout) for shard_id, path in existing_shards(root, manifest)
                   if shard_ids is None or shard_id in shard_ids}
        try:
            return readers, IndexSet.open(root, manifest, readers)
        except IndexMoved as moved:
            manifest = moved.manifest
            for reader in readers.values():
                reader.close()
        except BaseException:
            for reader in readers.values():
                reader.close()
            raise
    raise StoreError(f"{root}: the database index was replaced {MOVED_RETRIES} times while it was being opened; "
                     "try again")
