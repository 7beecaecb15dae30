"""The FAISS side of a shard: build, save, load and search inner-product indexes.

FAISS holds the rows themselves (attribdb/rows.py says in what form), so its
inner products are the compressed scores or cosines the ranking uses.  A flat
index over rows in the row dtype stores them as they are, exactly the values
of the row store, at the row store's size; the stored-row scoring that follows
reads the same values and only adds per-module scores and the other ranking.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from attribdb.native import faiss
from attribdb.rows import ROW_DTYPE

HNSW_NEIGHBOURS = 32
ROW_QUANTIZER = {np.dtype(np.float16): faiss.ScalarQuantizer.QT_fp16}[np.dtype(ROW_DTYPE)]  # rows kept as stored
IVF_MIN_POINTS_PER_LIST = 39  # below this faiss warns that training is unreliable


def divide_by_norm(values, squared_norms):
    """values / √squared_norms, and 0 where that norm is 0: how a score or a sketch becomes a
    cosine's part, self-influence being a squared norm."""
    norms = np.sqrt(np.maximum(np.asarray(squared_norms, dtype=np.float64), 0.0))
    return np.divide(values, norms, out=np.zeros(np.broadcast(values, norms).shape), where=norms > 0)


def build_index(vectors: np.ndarray, kind: str, in_row_dtype: bool):
    """An inner-product index over ``vectors`` (N, D) float32, ids 0..N-1, of a per-shard ``kind``
    (attribdb/index_kinds.py).  Vectors ``in_row_dtype`` (RowLayout.index_in_row_dtype) are kept in
    a flat index so, exact at half a float32 index; others stay float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if (kind == "flat" or len(vectors) < IVF_MIN_POINTS_PER_LIST) and in_row_dtype:
        index = faiss.IndexScalarQuantizer(dim, ROW_QUANTIZER, faiss.METRIC_INNER_PRODUCT)
    elif kind == "flat" or len(vectors) < IVF_MIN_POINTS_PER_LIST:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // IVF_MIN_POINTS_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(vectors):
        index.add(vectors)
    return index


def write_index(index, path: Path) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: Path, mmap: bool = True):
    """Memory-mapped and read-only where the index type allows: the query process stays small.
    ``mmap=False`` reads it whole, for adding to it."""
    if not mmap:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def configure_search(index, candidates: int, nprobe: int | None = None) -> None:
    """Search-time knobs that trade speed for recall, sized to the candidate count; ``nprobe``
    where the index records its own (attribdb/db_index.py)."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(128, 2 * candidates)
    elif hasattr(index, "nprobe"):  # IVF, on CPU or GPU
        index.nprobe = nprobe or max(1, getattr(index, "nlist", 4) // 4)


def search(index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top ``k`` by inner product; ids -1 pad when the shard is small.  Rows
    narrower than the index are zero-padded to its width, as the rows it holds were
    (attribdb.rows.index_dim)."""
    k = min(k, index.ntotal)
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    configure_search(index, k, nprobe)
    queries = np.asarray(queries, dtype=np.float32)
    return index.search(np.pad(queries, ((0, 0), (0, index.d - queries.shape[1]))), k)
