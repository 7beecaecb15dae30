"""Every on-disk name of a database, defined once.

::

    mydb/
      manifest.json
      lock                          the writer lock (holder's pid), see writelock.py
      factors/factors.safetensors   Q_A, Q_S, D, λ per module (exact and exhaustive queries)
      factors/rows.safetensors      the row projections: kept eigenvectors and 1/√(Λ+λ) per module
      factors/checkpoint-C/         the same two files for checkpoint C ≥ 1 of a trajectory database
      shards/NNNNN/grads.zarr       the stored rows (attribdb/rows.py), one file per commit unit (packed_rows.py),
                                    and their self-influence, one chunk per commit unit
      shards/NNNNN/grads-C.zarr     the same for checkpoint C ≥ 1 of a trajectory database (the sequences, their
                                    metadata and text index stay one copy, in meta.lmdb and text.sqlite)
      shards/NNNNN/meta.lmdb        row metadata, document index, commit journal
      shards/NNNNN/text.sqlite      SQLite FTS5 index of the rows' text (BM25), see text_index.py
      index/rows-pq4-<rows>-<crc>.faiss   compact codes of every sealed shard's rows, at scale (the manifest
                                    names the current file; retired ones wait out a grace period, db_index.py)

Each row is stored once: FAISS holds codes, never a copy of the rows.
"""

from pathlib import Path

# 1: low-rank factors and CountSketches; 2: kron query maps on the eigenbasis; 3: one row per Zarr chunk file and
# float16 copies of the rows in FAISS; 4: float16 kron or block rows packed per commit unit (read no more:
# `attribdb build` a new database)
FORMAT_VERSION = 5
MANIFEST = "manifest.json"
LOCK_FILE = "lock"
FACTORS_DIR = "factors"
FACTORS_FILE = "factors.safetensors"
PROJECTION_FILE = "rows.safetensors"
SHARDS_DIR = "shards"
GRADS_ZARR = "grads.zarr"
META_LMDB = "meta.lmdb"
TEXT_FILE = "text.sqlite"
INDEX_DIR = "index"  # the database-wide FAISS index, when there is one (attribdb/db_index.py)

# arrays inside grads.zarr (attribdb/rows.py says what a row is)
ROWS = "rows"  # (rows, dim), packed one file per commit unit (attribdb/packed_rows.py)
SELF_INFLUENCE = "self_influence"  # (rows,)
ROW_ARRAYS = (ROWS, SELF_INFLUENCE)


# named databases inside meta.lmdb
ROWS_DB = b"rows"  # row (8-byte big-endian) -> JSON metadata
DOCS_DB = b"docs"  # document id -> JSON list of rows
JOURNAL_DB = b"journal"  # commit number -> JSON {rows_end, time}
INFO_DB = b"info"  # committed, capacity, sealed


def factors_dir(root: Path, checkpoint: int = 0) -> Path:
    """Checkpoint 0 (the database's model) keeps the folder every single-model database has."""
    folder = Path(root) / FACTORS_DIR
    return folder / f"checkpoint-{checkpoint}" if checkpoint else folder


def factors_path(root: Path, checkpoint: int = 0) -> Path:
    return factors_dir(root, checkpoint) / FACTORS_FILE


def projection_path(root: Path, checkpoint: int = 0) -> Path:
    return factors_dir(root, checkpoint) / PROJECTION_FILE


def factor_files(root: Path, checkpoint: int = 0) -> tuple[Path, ...]:
    """The files a fit writes; the manifest records their sha256 once all are written."""
    return factors_path(root, checkpoint), projection_path(root, checkpoint)


def grads_zarr(checkpoint: int = 0) -> str:
    """The row store of a checkpoint inside a shard's folder (checkpoint 0: every database's)."""
    return f"grads-{checkpoint}.zarr" if checkpoint else GRADS_ZARR


def shard_dir(root: Path, shard_id: int) -> Path:
    return Path(root) / SHARDS_DIR / f"{shard_id:05d}"


def row_key(row: int) -> bytes:
    return row.to_bytes(8, "big")
