"""One FAISS index over every shard's rows, for databases too large to search shard by shard.

Each shard seals its own flat index (exact, float16, as large as its rows).
Searching hundreds of them costs a scan of every row per query, which passes
50 ms somewhere past 10⁵ rows of a few hundred dimensions on one thread.  A
database-wide IVF index with 8-bit scalar-quantized codes scans only the
``nprobe`` lists nearest the query; its candidates are then rescored from the
stored rows as always, so quantization only decides which rows become
candidates, never their scores.

The rule (``index_kind="auto"``, the default): below :data:`AUTO_MIN_ROWS`
rows the shard indexes serve queries; from there on, the end of every build or
append brings the database index up to date.  ``ivf-sq8`` asks for it at any
size; ``flat``, ``hnsw`` and ``ivf`` keep per-shard indexes only.

Crash safety follows the shards: rows are committed and searchable in their
shards first.  The database index is written to a new file, renamed into
place, and only then recorded in the manifest (file, CRC32C, shards covered,
rows), so a reader sees either the old index or the new one, and any shard the
recorded index does not cover is searched through its own index.  A build killed
while writing it ends with the same index when it is run again.  Ids are
``shard << 32 | row``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.faiss_index import search

# Measured at 10⁵ rows (tools/bench_query.py --rows, README): shard-by-shard flat search took 193 ms
# per query, the database index 132 ms with every list probed, at half the bytes per row.  Query rows
# are not drawn from the rows' distribution (kron rows whiten the two sides differently), so
# recall@10 against brute force needs most lists: 0.51 at 1/10 of them, 0.90 at 1/2, 0.948 at
# 0.63, 0.967 at 3/4.
AUTO_MIN_ROWS = 100_000
TRAIN_POINTS_PER_LIST = 64  # k-means sample per list: enough for stable centroids, seconds at 10⁶ rows
NPROBE_SHARE = 3 / 4
MIN_NPROBE = 32
SHARD_BITS = 32


def wanted(index_kind: str, rows: int) -> bool:
    """Whether a database of ``rows`` rows with this index kind is served by a database index."""
    return index_kind == "ivf-sq8" or (index_kind == "auto" and rows >= AUTO_MIN_ROWS)


def list_count(rows: int) -> int:
    """√rows lists (about 1,000 at 10⁶), fewer when the rows cannot fill them for training."""
    return max(1, min(int(math.sqrt(rows)), rows // TRAIN_POINTS_PER_LIST))


def nprobe_for(nlist: int) -> int:
    return min(nlist, max(MIN_NPROBE, round(nlist * NPROBE_SHARE)))


def global_ids(shard_id: int, rows: int) -> np.ndarray:
    return (np.int64(shard_id) << SHARD_BITS) + np.arange(rows, dtype=np.int64)


def _file_crc32c(path: Path) -> str:
    from attribdb.shard import _file_crc32c as crc

    return crc(path).decode()


def update(root: Path, manifest, readers: dict) -> bool:
    """Bring the database index up to date with the sealed shards in ``readers`` (shard id →
    ShardReader) when the rule wants one; record it in the manifest.  True when it changed."""
    from attribdb.faiss_index import read_index, write_index

    settings, recorded = manifest.settings, manifest.database_index
    total = sum(reader.rows for reader in readers.values())
    if not wanted(settings.index_kind, total):
        return False
    covered = set(recorded["shards"]) if recorded else set()
    todo = [s for s, reader in sorted(readers.items()) if s not in covered and reader.sealed and reader.rows]
    if not todo:
        return False
    if recorded:
        index = read_index(root / layout.INDEX_DIR / recorded["file"], mmap=False)
    else:
        index = _trained(readers, total)
    for shard_id in todo:
        reader = readers[shard_id]
        index.add_with_ids(np.ascontiguousarray(reader.faiss_vectors(), dtype=np.float32),
                           global_ids(shard_id, reader.rows))
    shards = sorted(covered | set(todo))
    folder = root / layout.INDEX_DIR
    folder.mkdir(exist_ok=True)
    name = f"rows-ivf-sq8-{len(shards):05d}-{index.ntotal}.faiss"
    write_index(index, folder / name)
    manifest.database_index = {"kind": "ivf-sq8", "file": name, "crc32c": _file_crc32c(folder / name),
                               "shards": shards, "rows": int(index.ntotal), "nlist": int(index.nlist),
                               "nprobe": nprobe_for(index.nlist)}
    manifest.save(root)
    for stale in folder.iterdir():  # earlier versions, and leftovers of a killed run
        if stale.name != name:
            stale.unlink()
    return True


def _trained(readers: dict, total: int):
    """An empty IVF-SQ8 index whose lists and quantizer ranges are trained on rows sampled evenly
    from every shard (seeded: the same database trains the same index)."""
    from attribdb.native import faiss

    nlist = list_count(total)
    share = min(1.0, TRAIN_POINTS_PER_LIST * nlist / total)
    rng = np.random.default_rng(0)
    sample = []
    for _, reader in sorted(readers.items()):
        if reader.sealed and reader.rows:
            rows = np.flatnonzero(rng.random(reader.rows) < share)
            sample.append(reader.faiss_vectors(rows))
    vectors = np.ascontiguousarray(np.concatenate(sample), dtype=np.float32)
    dim = vectors.shape[1]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(vectors)
    return index


class IndexSet:
    """The FAISS indexes a query searches: the database index, if any, for the shards it covers,
    and each other shard's own index; one search merges them into (score, shard, row) lists."""

    def __init__(self, shard_indexes: dict, database=None, nprobe: int | None = None):
        self.shard_indexes, self.database, self.nprobe = shard_indexes, database, nprobe

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
        return cls(shard_indexes, database, recorded["nprobe"] if database is not None else None)

    @property
    def kinds(self) -> str:
        parts = [f"{len(self.shard_indexes)} shard indexes"] if self.shard_indexes else []
        if self.database is not None:
            parts.append(f"database ivf-sq8 ({self.database.ntotal} rows, nprobe {self.nprobe})")
        return " + ".join(parts) or "none"

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[float, int, int]]]:
        """Per query, the best ``k`` (score, shard, row) by inner product over every index."""
        merged = [[] for _ in range(len(queries))]
        for shard_id, index in self.shard_indexes.items():
            scores, ids = search(index, queries, k)
            for i in range(len(queries)):
                merged[i] += [(float(s), shard_id, int(r)) for s, r in zip(scores[i], ids[i]) if r >= 0]
        if self.database is not None:
            scores, ids = search(self.database, queries, k, nprobe=self.nprobe)
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
