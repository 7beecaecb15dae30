"""One FAISS index over every shard's rows, for databases too large to search shard by shard.

Each shard seals its own flat index (exact, float16, as large as its rows).
Searching hundreds of them costs a scan of every row per query, which passes
50 ms somewhere past 10⁵ rows of a few hundred dimensions on one thread.  The
database index scans every row instead, in a fraction of the bytes, and re-ranks
the best of that scan exactly:

- ``pq4`` (the default): 4-bit product quantization with one sub-quantizer per
  coordinate (16 learned levels each), searched with FAISS's fast-scan kernels,
  followed by re-ranking :data:`REFINE_FACTOR` times the requested candidates
  from float16 copies of the rows, which are the row store's values bit for bit.
  Every row is scanned, so query rows need not resemble the stored rows (they do
  not: kron rows whiten the two sides differently), and the candidates' scores are
  the exact inner products with the stored rows.
- ``ivf-sq8``: an IVF index with 8-bit scalar-quantized codes that scans the
  ``nprobe`` lists nearest the query (3/4 of them: off-distribution query rows
  need most lists).  Kept for comparison and for databases built with it.

Candidates are rescored from the stored rows as always, so quantization only
decides which rows become candidates, never their scores.

The rule (``index_kind="auto"``, the default): below :data:`AUTO_MIN_ROWS`
rows the shard indexes serve queries; from there on, the end of every build or
append brings the ``pq4`` database index up to date.  ``pq4`` and ``ivf-sq8``
ask for theirs at any size; ``flat``, ``hnsw`` and ``ivf`` keep per-shard
indexes only.  A recorded index of another kind than the settings want (one
made by an earlier attribdb) serves queries until the next build or append
replaces it.

Crash safety follows the shards: rows are committed and searchable in their
shards first.  The database index is written to a new file, renamed into
place, and only then recorded in the manifest (kind, file, CRC32C, shards
covered, rows), so a reader sees either the old index or the new one, and any
shard the recorded index does not cover is searched through its own index.  A
build killed while writing it ends with the same index when it is run again.
Ids are ``shard << 32 | row``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.faiss_index import search
from attribdb.index_kinds import AUTO, DATABASE_KINDS
from attribdb.rows import ROW_DTYPE

# Measured with tools/benchmarks/bench_query.py --rows (README), one thread, 243-coordinate rows, 200 queries.  At 10⁵
# rows shard-by-shard flat search took 193 ms per query, IVF-SQ8 132 ms with every list probed and still 50 ms
# at the 3/4 of its lists that recall@10 ≥ 0.95 needs against brute force (query rows are not drawn from the
# rows' distribution: 0.51 at 1/10 of the lists, 0.90 at 1/2).  pq4 scans all 10⁵ rows at 122 bytes each in
# under 1 ms per query end; the true top 10 were always within its best 201 (p95 29).  At 10⁶ rows they were
# always within its best 103 (p95 32), and a query's two ends took 11-14 ms with 2 to 8 × 128 re-ranked (machine
# load 4): re-ranking 8 × the candidates costs nothing measurable and leaves a wide margin.  The threshold
# itself was not measured again with pq4: below it the shards' own indexes answer exactly.
AUTO_MIN_ROWS = 100_000
DEFAULT_KIND = DATABASE_KINDS[0]
REFINE_FACTOR = 8  # pq4: rows re-ranked from float16 per candidate requested
PQ_BITS = 4  # fast-scan kernels take 4-bit codes only
PQ_TRAIN_ROWS = 65_536  # 4,096 rows per level of each coordinate's 16
TRAIN_POINTS_PER_LIST = 64  # ivf-sq8: k-means sample per list, enough for stable centroids, seconds at 10⁶ rows
NPROBE_SHARE = 3 / 4
MIN_NPROBE = 32
SHARD_BITS = 32


def database_kind(index_kind: str) -> str | None:
    """The kind of database index an ``index_kind`` setting asks for (None: per-shard indexes only)."""
    return DEFAULT_KIND if index_kind == AUTO else index_kind if index_kind in DATABASE_KINDS else None


def wanted(index_kind: str, rows: int) -> bool:
    """Whether a database of ``rows`` rows with this index kind is served by a database index."""
    return index_kind in DATABASE_KINDS or (index_kind == AUTO and rows >= AUTO_MIN_ROWS)


def list_count(rows: int) -> int:
    """ivf-sq8: √rows lists (about 1,000 at 10⁶), fewer when the rows cannot fill them for training."""
    return max(1, min(int(math.sqrt(rows)), rows // TRAIN_POINTS_PER_LIST))


def nprobe_for(nlist: int) -> int:
    return min(nlist, max(MIN_NPROBE, round(nlist * NPROBE_SHARE)))


def global_ids(shard_id: int, rows: int) -> np.ndarray:
    return (np.int64(shard_id) << SHARD_BITS) + np.arange(rows, dtype=np.int64)


def _file_crc32c(path: Path) -> str:
    from attribdb.shard import file_crc32c

    return file_crc32c(path).decode()


def update(root: Path, manifest, readers: dict) -> bool:
    """Bring the database index up to date with the sealed shards in ``readers`` (shard id →
    ShardReader) when the rule wants one; record it in the manifest.  True when it changed.  A
    recorded index of another kind is replaced by a new one over every sealed shard."""
    from attribdb.faiss_index import read_index, write_index

    settings = manifest.settings
    kind = database_kind(settings.index_kind)
    total = sum(reader.rows for reader in readers.values())
    if not wanted(settings.index_kind, total):
        return False
    recorded = manifest.database_index if (manifest.database_index or {}).get("kind") == kind else None
    covered = set(recorded["shards"]) if recorded else set()
    todo = [s for s, reader in sorted(readers.items()) if s not in covered and reader.sealed and reader.rows]
    if not todo:
        return False
    if recorded:
        index = read_index(root / layout.INDEX_DIR / recorded["file"], mmap=False)
    else:
        index = _trained(kind, readers, total)
    for shard_id in todo:
        reader = readers[shard_id]
        index.add_with_ids(np.ascontiguousarray(reader.faiss_vectors(), dtype=np.float32),
                           global_ids(shard_id, reader.rows))
    shards = sorted(covered | set(todo))
    folder = root / layout.INDEX_DIR
    folder.mkdir(exist_ok=True)
    name = f"rows-{kind}-{len(shards):05d}-{index.ntotal}.faiss"
    write_index(index, folder / name)
    knobs = ({"refine": REFINE_FACTOR} if kind == "pq4" else
             {"nlist": int(index.nlist), "nprobe": nprobe_for(index.nlist)})
    manifest.database_index = {"kind": kind, "file": name, "crc32c": _file_crc32c(folder / name),
                               "shards": shards, "rows": int(index.ntotal)} | knobs
    manifest.save(root)
    for stale in folder.iterdir():  # earlier versions, and leftovers of a killed run
        if stale.name != name:
            stale.unlink()
    return True


def describe(recorded: dict) -> str:
    """One line on a recorded database index, for build output and ``info``."""
    if recorded["kind"] == "pq4":
        return f"{recorded['rows']} rows, 4-bit PQ re-ranked from float16 ({recorded['refine']}x candidates)"
    return f"{recorded['rows']} rows in {recorded['nlist']} lists, nprobe {recorded['nprobe']}"


def _sample(readers: dict, total: int, size: int) -> np.ndarray:
    """About ``size`` rows' index vectors sampled evenly from every sealed shard (seeded: the same
    database trains the same index)."""
    share = min(1.0, size / total)
    rng = np.random.default_rng(0)
    sample = []
    for _, reader in sorted(readers.items()):
        if reader.sealed and reader.rows:
            rows = np.flatnonzero(rng.random(reader.rows) < share)
            sample.append(reader.faiss_vectors(rows))
    return np.ascontiguousarray(np.concatenate(sample), dtype=np.float32)


def _trained(kind: str, readers: dict, total: int):
    """An empty database index of ``kind``, trained on rows sampled from every shard."""
    from attribdb.native import faiss

    if kind == "pq4":
        vectors = _sample(readers, total, PQ_TRAIN_ROWS)
        dim = vectors.shape[1]
        in_row_dtype = next(iter(readers.values())).layout.index_in_row_dtype
        refine = "SQfp16" if in_row_dtype else "Flat"  # re-ranking copies: the stored rows, or float32
        index = faiss.index_factory(dim, f"IDMap,PQ{dim}x{PQ_BITS}fs,Refine({refine})", faiss.METRIC_INNER_PRODUCT)
        codes = faiss.downcast_index(faiss.downcast_index(index.index).base_index)
        # 16 centroids per coordinate from fewer than 39 x 16 rows is fine here (the refinement re-ranks
        # from float16 copies), and faiss would print a warning on stderr for every sub-quantizer
        codes.pq.cp.min_points_per_centroid = 1
        index.train(vectors)
        return index
    nlist = list_count(total)
    vectors = _sample(readers, total, TRAIN_POINTS_PER_LIST * nlist)
    dim = vectors.shape[1]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(vectors)
    return index


class IndexSet:
    """The FAISS indexes a query searches: the database index, if any, for the shards it covers,
    and each other shard's own index; one search merges them into (score, shard, row) lists."""

    def __init__(self, shard_indexes: dict, database=None, recorded: dict | None = None):
        self.shard_indexes, self.database, self.recorded = shard_indexes, database, recorded
        self._positions = None  # stored_rows: the database index's ids, sorted, and their positions

    @classmethod
    def open(cls, root: Path, manifest, readers: dict, device=None) -> "IndexSet":
        """``readers``: shard id → ShardReader of the shards to search.  The database index is used
        when every shard it covers is among them (a query restricted to some shards searches theirs)."""
        recorded, database = manifest.database_index, None
        if recorded and set(recorded["shards"]) <= set(readers):
            database = _open_recorded(root, recorded, readers)
        covered = set(recorded["shards"]) if database is not None else set()
        shard_indexes = {s: reader.index() for s, reader in readers.items() if reader.rows and s not in covered}
        if device is not None and str(device).startswith("cuda"):
            shard_indexes = {s: to_gpu(index) for s, index in shard_indexes.items()}
            database = to_gpu(database) if database is not None else None
        return cls(shard_indexes, database, recorded if database is not None else None)

    def stored_rows(self, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray | None:
        """The stored rows (``dim`` wide, without the index's zero padding) of (shard, row)
        pairs from a pq4 index's re-ranking copies (the row store's values bit for bit, checked by
        the file's CRC32C on open), so candidates need no row-store reads; None when the database
        index holds no such copies or lacks a pair."""
        if self.database is None or self.recorded["kind"] != "pq4":
            return None
        from attribdb.native import faiss

        refine = faiss.downcast_index(faiss.downcast_index(self.database.index).refine_index)
        if not isinstance(refine, faiss.IndexScalarQuantizer):  # rows at their own length: float32 copies
            return None
        if self._positions is None:  # ids in the order they were added, sorted once for lookups
            ids = faiss.vector_to_array(self.database.id_map)
            order = np.argsort(ids, kind="stable")
            self._positions = (ids[order], order)
        sorted_ids, order = self._positions
        wanted = (np.asarray(shards, dtype=np.int64) << SHARD_BITS) + np.asarray(rows, dtype=np.int64)
        at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
        if len(wanted) == 0 or not np.array_equal(sorted_ids[at], wanted):
            return None
        return refine.reconstruct_batch(order[at].astype(np.int64))[:, :dim].astype(ROW_DTYPE)

    @property
    def kinds(self) -> str:
        parts = [f"{len(self.shard_indexes)} shard indexes"] if self.shard_indexes else []
        if self.database is not None:
            parts.append(f"database {self.recorded['kind']} ({describe(self.recorded)})")
        return " + ".join(parts) or "none"

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[float, int, int]]]:
        """Per query, the best ``k`` (score, shard, row) by inner product over every index."""
        merged = [[] for _ in range(len(queries))]
        for shard_id, index in self.shard_indexes.items():
            scores, ids = search(index, queries, k)
            for i in range(len(queries)):
                merged[i] += [(float(s), shard_id, int(r)) for s, r in zip(scores[i], ids[i]) if r >= 0]
        if self.database is not None:
            scores, ids = search(self.database, queries, k, nprobe=self.recorded.get("nprobe"))
            for i in range(len(queries)):
                merged[i] += [(float(s), int(r) >> SHARD_BITS, int(r) & ((1 << SHARD_BITS) - 1))
                              for s, r in zip(scores[i], ids[i]) if r >= 0]
        return [sorted(found, reverse=True)[:k] for found in merged]


def _open_recorded(root: Path, recorded: dict, readers: dict):
    """The recorded database index, checked: its file's CRC32C and its row count against the shards."""
    from attribdb.faiss_index import read_index

    path = root / layout.INDEX_DIR / recorded["file"]
    if not path.is_file():
        raise StoreError(f"{path} is missing: the database index is damaged (run `attribdb build` again to "
                         "rebuild it)")
    if _file_crc32c(path) != recorded["crc32c"]:
        raise StoreError(f"{path} fails its checksum: the database index is damaged")
    try:
        index = read_index(path)
    except RuntimeError as exc:
        raise StoreError(f"{path} cannot be read: {str(exc).splitlines()[0][:120]}") from None
    rows = sum(readers[s].rows for s in recorded["shards"])
    if index.ntotal != recorded["rows"] or rows != recorded["rows"]:
        raise StoreError(f"{path} holds {index.ntotal} vectors, the manifest records {recorded['rows']} and its "
                         f"shards hold {rows} rows: the database index is damaged")
    if recorded["kind"] == "pq4":
        from attribdb.native import faiss

        faiss.downcast_index(index.index).k_factor = float(recorded["refine"])
    return index


def to_gpu(index):
    """The index on GPU 0 when faiss-gpu is installed and sees a GPU; else (or for an index kind
    the GPU cloner refuses, such as HNSW) the index as it is."""
    from attribdb.native import faiss

    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "StandardGpuResources"):
        return index
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except RuntimeError:
        return index


_GPU_RESOURCES = None  # one set of GPU scratch memory per process, made on first use
