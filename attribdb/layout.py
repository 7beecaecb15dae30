"""Every on-disk name of a database, defined once.

::

    mydb/
      manifest.json
      lock                          the writer lock (holder's pid), see writelock.py
      factors/factors.safetensors   Q_A, Q_S, D, λ per module (exact and exhaustive queries)
      factors/rows.safetensors      the row projections: kept eigenvectors and 1/√(Λ+λ) per module
      shards/NNNNN/grads.zarr       the stored rows and their self-influence (attribdb/rows.py)
      shards/NNNNN/meta.lmdb        row metadata, document index, commit journal
      shards/NNNNN/rows.faiss       inner-product index over the shard's rows
      shards/NNNNN/text.sqlite      SQLite FTS5 index of the rows' text (BM25), see text_index.py
      index/rows-<kind>-*.faiss     one index over every shard's rows, at scale (the manifest names it)
"""

from pathlib import Path

FORMAT_VERSION = 3  # 1: low-rank factors and CountSketches; 2: kron query maps on the eigenbasis (read no more)
MANIFEST = "manifest.json"
LOCK_FILE = "lock"
FACTORS_DIR = "factors"
FACTORS_FILE = "factors.safetensors"
PROJECTION_FILE = "rows.safetensors"
SHARDS_DIR = "shards"
GRADS_ZARR = "grads.zarr"
META_LMDB = "meta.lmdb"
FAISS_FILE = "rows.faiss"
TEXT_FILE = "text.sqlite"
INDEX_DIR = "index"  # the database-wide FAISS index, when there is one (attribdb/db_index.py)

# arrays inside grads.zarr (attribdb/rows.py says what a row is)
ROWS = "rows"  # (rows, dim)
SELF_INFLUENCE = "self_influence"  # (rows,)
ROW_ARRAYS = (ROWS, SELF_INFLUENCE)


# named databases inside meta.lmdb
ROWS_DB = b"rows"  # row (8-byte big-endian) -> JSON metadata
DOCS_DB = b"docs"  # document id -> JSON list of rows
JOURNAL_DB = b"journal"  # commit number -> JSON {rows_end, time}
INFO_DB = b"info"  # committed, capacity, sealed


def factors_path(root: Path) -> Path:
    return Path(root) / FACTORS_DIR / FACTORS_FILE


def projection_path(root: Path) -> Path:
    return Path(root) / FACTORS_DIR / PROJECTION_FILE


def factor_files(root: Path) -> tuple[Path, ...]:
    """The files a fit writes; the manifest records their sha256 once all are written."""
    return factors_path(root), projection_path(root)


def shard_dir(root: Path, shard_id: int) -> Path:
    return Path(root) / SHARDS_DIR / f"{shard_id:05d}"


def row_key(row: int) -> bytes:
    return row.to_bytes(8, "big")
