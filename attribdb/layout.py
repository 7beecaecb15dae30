"""Every on-disk name of a database, defined once.

::

    mydb/
      manifest.json
      lock                          the writer lock (holder's pid), see writelock.py
      factors/factors.safetensors   Q_A, Q_S, D, λ per module
      factors/sketch.safetensors    the sketch projections
      shards/NNNNN/grads.zarr       low-rank factors, σ, energy, sketch, self-influence
      shards/NNNNN/meta.lmdb        row metadata, document index, commit journal
      shards/NNNNN/sketch.faiss     inner-product index over the shard's sketches
"""

from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = "lock"
FACTORS_DIR = "factors"
FACTORS_FILE = "factors.safetensors"
SKETCH_FILE = "sketch.safetensors"
SHARDS_DIR = "shards"
GRADS_ZARR = "grads.zarr"
META_LMDB = "meta.lmdb"
FAISS_FILE = "sketch.faiss"

# arrays inside grads.zarr
LOWRANK = "lowrank"  # (rows, P) float16: per module U (r × d_out) then V (r × d_in), flattened
SIGMA = "sigma"  # (rows, modules, r) float32
ENERGY = "energy"  # (rows, modules) float32: fraction of ‖Ĝ‖² the rank kept
TAIL = "tail"  # (rows, P_tail) float16: singular triplets rank+1 .. rank+tail_rank, packed like LOWRANK
TAIL_SIGMA = "tail_sigma"  # (rows, modules, tail_rank) float32
SKETCH = "sketch"  # (rows, sketch_dim) float32
SELF_INFLUENCE = "self_influence"  # (rows,) float32


def row_arrays(tail_rank: int) -> tuple[str, ...]:
    """The arrays every row has a value in."""
    tail = (TAIL, TAIL_SIGMA) if tail_rank else ()
    return (LOWRANK, SIGMA, ENERGY, SKETCH, SELF_INFLUENCE) + tail


# named databases inside meta.lmdb
ROWS_DB = b"rows"  # row (8-byte big-endian) -> JSON metadata
DOCS_DB = b"docs"  # document id -> JSON list of rows
JOURNAL_DB = b"journal"  # commit number -> JSON {rows_end, time}
INFO_DB = b"info"  # committed, capacity, sealed


def factors_path(root: Path) -> Path:
    return Path(root) / FACTORS_DIR / FACTORS_FILE


def sketch_path(root: Path) -> Path:
    return Path(root) / FACTORS_DIR / SKETCH_FILE


def factor_files(root: Path) -> tuple[Path, ...]:
    """The files a fit writes; the manifest records their sha256 once all are written."""
    return factors_path(root), sketch_path(root)


def shard_dir(root: Path, shard_id: int) -> Path:
    return Path(root) / SHARDS_DIR / f"{shard_id:05d}"


def row_key(row: int) -> bytes:
    return row.to_bytes(8, "big")
