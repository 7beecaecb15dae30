"""Candidate search: one FAISS index of compact codes over the database's rows.

FAISS holds no copy of a row.  A row's payload (attribdb/rows.py) is a sum of bilinear forms
FAISS cannot search, so FAISS holds codes of the row's *sketch*, a vector of
:data:`attribdb.rows.SKETCH_DIM` coordinates whose inner product with a query's sketch
estimates the row's score.  The database index (kind ``pq4``) is a 4-bit product-quantization
fast-scan of the sketches (one sub-quantizer per :func:`scan_dims` coordinates: 2 bits a
coordinate, 1 KiB a row); its best rows are the candidates, and the query engine scores them
from their payloads (query/store.py).  The sketch only has to rank the rows a query really
scores high within the candidates, not order them: its estimate is noisy (docs/evidence.md).

Fast-scan is the only code FAISS scans fast (80-180 ns per row on one core), and its look-up
tables stay precise up to about :data:`MAX_SUB_QUANTIZERS` sub-quantizers.

Shards the database index does not cover are scanned from their sketches, made from their
payloads once per process: every shard of a database with less than :data:`AUTO_MIN_BYTES` of
rows (``index_kind="auto"``) or built with ``flat``, and shards sealed since the index was last
brought up to date.

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
from attribdb.shard import ShardReader

KIND = DATABASE_KINDS[0]  # the database index kind, and the index_kind setting that asks for it at any size
# auto: a database index once the rows hold this much: about 1,100 rows of the default size, whose
# sketches take about a second to make from their payloads when a process first scans them
AUTO_MIN_BYTES = 32 << 20
MAX_SUB_QUANTIZERS = 2048  # fast-scan's look-up tables stay precise up to about this many
TRAIN_ROWS = 4096  # 256 rows per level of each 16-level sub-quantizer
RETRAIN_GROWTH = 4  # retrain once the sample a retraining would use is this many times the one it used
GRACE_SECONDS = 900  # a retired index file outlives the manifest that named it by at least this
MOVED_RETRIES = 5
SHARD_BITS = 32
SCAN_BLOCK_BYTES = 64 << 20  # float32 vectors scored at once when a shard is scanned


def wanted(index_kind: str, row_store_bytes: int) -> bool:
    """Whether a database of this index kind, holding this many bytes of rows, has a database index."""
    return index_kind == KIND or (index_kind == AUTO and row_store_bytes >= AUTO_MIN_BYTES)


def global_ids(shard_id: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(shard_id) << SHARD_BITS) + np.asarray(rows, dtype=np.int64)


def scan_dims(width: int) -> int:
    """Coordinates per fast-scan sub-quantizer for codes ``width`` wide (a power of two dividing it)."""
    dims = 1
    while width // dims > MAX_SUB_QUANTIZERS:
        dims *= 2
    return dims


def _empty(width: int):
    """An untrained database index for index vectors ``width`` wide (RowLayout.index_dim)."""
    from attribdb.native import faiss

    scan = faiss.IndexPQFastScan(width, width // scan_dims(width), 4, faiss.METRIC_INNER_PRODUCT)
    scan.pq.cp.min_points_per_centroid = 1  # small databases train on few rows; faiss would warn per sub-quantizer
    scan.pq.cp.niter = 10
    return faiss.IndexIDMap(scan)  # the wrapper keeps its part alive


def _scan(index):
    """The fast-scan index inside a database index, valid while it lives."""
    from attribdb.native import faiss

    return faiss.downcast_index(index.index)


def code_bytes(width: int) -> int:
    """Bytes the database index holds per row of index vectors ``width`` wide: its codes and its id."""
    index = _empty(width)  # alive while its part is read: it belongs to it
    return _scan(index).code_size + np.dtype(np.int64).itemsize


def _sealed(readers: dict) -> dict:
    return {s: reader for s, reader in sorted(readers.items()) if reader.sealed and reader.rows}


def _block_rows(width: int) -> int:
    """Rows of float32 index vectors ``width`` wide in :data:`SCAN_BLOCK_BYTES`."""
    return max(1, SCAN_BLOCK_BYTES // (4 * width))


def _blocks(reader: ShardReader, projection):
    """A shard's rows in blocks of about :data:`SCAN_BLOCK_BYTES` as float32 index vectors."""
    size = _block_rows(reader.layout.index_dim)
    for start in range(0, reader.rows, size):
        rows = np.arange(start, min(start + size, reader.rows))
        yield rows, reader.faiss_vectors(projection, rows)


def _trained(sealed: dict, total: int, projection):
    """An empty database index trained on about :data:`TRAIN_ROWS` rows sampled evenly from every
    sealed shard (seeded: the same database trains the same index)."""
    share = min(1.0, TRAIN_ROWS / total)
    rng = np.random.default_rng(0)
    sample = [reader.faiss_vectors(projection, np.flatnonzero(rng.random(reader.rows) < share))
              for reader in sealed.values()]
    index = _empty(projection.layout.index_dim)
    index.train(np.concatenate(sample))
    return index


def update(root: Path, manifest, readers: dict, projection, checkpoint: int = 0) -> bool:
    """Bring checkpoint ``checkpoint``'s database index up to date with the sealed shards in
    ``readers`` (shard id → ShardReader of that checkpoint's rows, their index vectors made by
    ``projection``, attribdb/rows.py) when the index kind wants one; record it in the manifest.
    True when it changed.
    An index trained on a sample :data:`RETRAIN_GROWTH` times smaller than the shards now offer is
    trained again, over every sealed shard."""
    sealed = _sealed(readers)
    total = sum(reader.rows for reader in sealed.values())
    row_bytes = next(iter(readers.values())).layout.bytes_per_row if readers else 0
    if not total or not wanted(manifest.settings.index_kind, total * row_bytes):
        return False
    holder = manifest.holder(checkpoint)
    recorded = holder.database_index
    folder = root / layout.INDEX_DIR
    intact = recorded is not None and (folder / recorded["file"]).is_file() and \
        _file_crc32c(folder / recorded["file"]) == recorded["crc32c"]  # else rebuilt: what verify's advice promises
    retrain = not intact or min(total, TRAIN_ROWS) >= RETRAIN_GROWTH * recorded["trained_on"]
    covered = set() if retrain else set(recorded["shards"])
    todo = [s for s in sealed if s not in covered]
    if not todo:
        return False
    index = _trained(sealed, total, projection) if retrain else read_index(folder / recorded["file"], mmap=False)
    for shard_id in todo:
        for rows, vectors in _blocks(sealed[shard_id], projection):
            index.add_with_ids(vectors, global_ids(shard_id, rows))
    folder.mkdir(exist_ok=True)
    made = folder / f"rows-{KIND}.new"  # named by its content once written
    write_index(index, made)
    crc = _file_crc32c(made)
    name = f"rows-{KIND}-{index.ntotal}-{crc}.faiss"
    os.replace(made, folder / name)
    if recorded and recorded["file"] != name and (folder / recorded["file"]).is_file():
        os.utime(folder / recorded["file"])  # retired now: the grace period starts (before the manifest moves on)
    holder.database_index = {"kind": KIND, "file": name, "crc32c": crc, "shards": sorted(covered | set(todo)),
                               "rows": int(index.ntotal),
                               "trained_on": recorded["trained_on"] if not retrain else min(total, TRAIN_ROWS)}
    manifest.save(root)
    return True


def collect_retired(root: Path, manifest) -> list[str]:
    """Delete the index files no manifest has named for :data:`GRACE_SECONDS` (and leftovers of
    killed writers as old); the names deleted."""
    folder = root / layout.INDEX_DIR
    keep = {(manifest.holder(c).database_index or {}).get("file") for c in range(manifest.checkpoint_count)}
    deleted = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            if path.name not in keep and time.time() - path.stat().st_mtime > GRACE_SECONDS:
                path.unlink()
                deleted.append(path.name)
        except FileNotFoundError:  # another writer's cleanup (a writer that lost the lock) got there first
            continue
    return deleted


def check_codes(index, readers: dict, covered: list[int], projection) -> None:
    """Raise a StoreError naming the first covered shard whose rows the database index does not
    hold, or holds codes for that their rows do not encode to (codes built from another row would
    make a row a candidate for the wrong queries; its CRC32C cannot tell)."""
    from attribdb.native import faiss

    ids = faiss.vector_to_array(index.id_map)
    order = np.argsort(ids, kind="stable")
    scan = _scan(index)
    for shard_id in covered:
        for rows, vectors in _blocks(readers[shard_id], projection):
            wanted = global_ids(shard_id, rows)
            at = order[np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)]
            same = ids[at] == wanted
            same &= np.all(scan.reconstruct_batch(at) == scan.sa_decode(scan.sa_encode(vectors)), axis=1)
            if not same.all():
                raise StoreError(f"the database index's codes of shard {shard_id:05d} row {rows[np.argmin(same)]} "
                                 "differ from its row: the database index is damaged (delete it and run "
                                 "`attribdb build` again to rebuild it)")


def describe(recorded: dict) -> str:
    """One line on a recorded database index, for build output and ``info``."""
    return f"{recorded['rows']} rows in compact codes of their sketches, candidates scored from their rows"


def _file_crc32c(path: Path) -> str:
    from attribdb.shard import file_crc32c

    return file_crc32c(path).decode()


class IndexMoved(Exception):
    """The recorded database index file is gone because a writer recorded another one since."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest


class IndexSet:
    """What a query searches: the database index for the shards it covers, the index vectors of
    every other shard; one search merges them into (score, shard, row) lists of candidates."""

    def __init__(self, readers: dict, projection, database=None, recorded: dict | None = None):
        """``readers`` and ``projection``: one checkpoint's (attribdb/shard.py ShardReader.view)."""
        self.readers, self.projection, self.database, self.recorded = readers, projection, database, recorded
        covered = set(recorded["shards"]) if database is not None else set()
        self.scanned = {s: reader for s, reader in readers.items() if reader.rows and s not in covered}
        self._scanned_vectors: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: Path, manifest, readers: dict, projection, checkpoint: int = 0) -> "IndexSet":
        """``readers``: shard id → ShardReader of the shards to search.  The database index is used
        when every shard it covers is among them (a query restricted to some shards scans theirs)."""
        recorded = manifest.holder(checkpoint).database_index
        if recorded and set(recorded["shards"]) <= set(readers):
            return cls(readers, projection, _open_recorded(root, recorded, readers, checkpoint), recorded)
        return cls(readers, projection)

    @property
    def kinds(self) -> str:
        parts = [f"{len(self.scanned)} shards scanned from their rows"] if self.scanned else []
        if self.database is not None:
            parts.append(f"database {KIND} ({describe(self.recorded)})")
        return " + ".join(parts) or "none"

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[float, int, int]]]:
        """Per query vector (a query's sketch), the best ``k`` (score, shard, row) by inner product
        with the rows' index vectors: exact over every scanned row, by the codes' estimate among
        the database index's rows."""
        queries = np.asarray(queries, dtype=np.float32)
        width = self.projection.layout.index_dim
        queries = np.ascontiguousarray(np.pad(queries, ((0, 0), (0, width - queries.shape[1]))))
        found = [[] for _ in range(len(queries))]
        for shard_id in self.scanned:
            vectors, size = self._vectors_of(shard_id), _block_rows(width)
            for start in range(0, len(vectors), size):
                block = vectors[start:start + size]
                _keep_best(found, queries @ block.T, shard_id, np.arange(start, start + len(block)), k)
        if self.database is not None and len(queries):
            scores, ids = self.database.search(queries, min(k, self.database.ntotal))
            for hits, row_scores, row_ids in zip(found, scores, ids):
                hits += [(float(score), int(i >> SHARD_BITS), int(i & ((1 << SHARD_BITS) - 1)))
                         for score, i in zip(row_scores, row_ids) if i >= 0]
        return [sorted(hits, reverse=True)[:k] for hits in found]

    def _vectors_of(self, shard_id: int) -> np.ndarray:
        """A scanned shard's index vectors, made from its payloads on first need and kept: the
        shards a database index does not cover are few and small (:data:`AUTO_MIN_BYTES`)."""
        if shard_id not in self._scanned_vectors:
            self._scanned_vectors[shard_id] = np.concatenate(
                [vectors for _, vectors in _blocks(self.scanned[shard_id], self.projection)])
        return self._scanned_vectors[shard_id]


def _keep_best(found: list, scores: np.ndarray, shard_id: int, rows: np.ndarray, k: int) -> None:
    """Add each query's best ``k`` of ``scores`` (queries × rows) to its list in ``found``."""
    if scores.shape[1] > k:
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        best = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    for hits, picked, row_scores in zip(found, best, scores):
        hits += [(float(row_scores[j]), shard_id, int(rows[j])) for j in picked]


def _open_recorded(root: Path, recorded: dict, readers: dict, checkpoint: int):
    """The recorded database index, checked: its file's CRC32C and its row count against the shards.
    A file that is gone because the manifest now names another raises :class:`IndexMoved`."""
    path = root / layout.INDEX_DIR / recorded["file"]
    try:
        intact = _file_crc32c(path) == recorded["crc32c"]
        index = read_index(path) if intact else None
    except (FileNotFoundError, RuntimeError) as exc:
        current = Manifest.load(root)
        if current.holder(checkpoint).database_index != recorded:
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


def open_searchable(root: Path, manifest, projection, shard_ids=None) -> tuple[dict, IndexSet]:
    """The shards of ``manifest`` (those in ``shard_ids``, default all) and the indexes to search
    them, opened together.  When a writer recorded a new database index, and the file named by
    ``manifest`` is already gone, everything is opened again from the manifest now on disk."""
    from attribdb.inspection import existing_shards

    for _ in range(MOVED_RETRIES):
        readers = {shard_id: ShardReader(path, projection.layout) for shard_id, path in existing_shards(root, manifest)
                   if shard_ids is None or shard_id in shard_ids}
        try:
            return readers, IndexSet.open(root, manifest, readers, projection)
        except IndexMoved as moved:
            manifest = moved.manifest
            for reader in readers.values():
                reader.close()
        except BaseException:
            for reader in readers.values():
                reader.close()
            raise
    raise _moved_too_often(root)


def open_checkpoint(root: Path, manifest, readers: dict, projection, checkpoint: int) -> IndexSet:
    """The indexes of checkpoint ``checkpoint`` over ``readers`` (views of shards already open,
    attribdb/shard.py ShardReader.view), read again from the manifest now on disk when a writer
    moved its database index on meanwhile."""
    for _ in range(MOVED_RETRIES):
        try:
            return IndexSet.open(root, manifest, readers, projection, checkpoint)
        except IndexMoved as moved:
            manifest = moved.manifest
    raise _moved_too_often(root)


def _moved_too_often(root: Path) -> StoreError:
    return StoreError(f"{root}: the database index was replaced {MOVED_RETRIES} times while it was being opened; "
                      "try again")
