"""One shard: Zarr arrays of compressed gradients, LMDB metadata, a FAISS index.

A shard is written by exactly one process, in commit units of
``commit_rows`` rows: the unit's Zarr chunks are written first, then one LMDB
transaction records the rows' metadata, a journal entry and the new committed
count.  Every Zarr chunk is aligned to commit units (the low-rank array has
one row per chunk, for random reads), so a chunk is written once and a kill
can only leave garbage in rows that were never committed, which a resumed
build overwrites.  Sealing builds the FAISS index once all rows are in.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribdb import layout, metadb
from attribdb.errors import StoreError
from attribdb.rows import RowLayout, index_vectors


@dataclass
class RowBlock:
    """A commit unit's computed rows, ready to write (numpy arrays, N rows each)."""

    rows: np.ndarray  # (N, dim) float16 unit rows (attribdb/rows.py)
    self_influence: np.ndarray  # (N,) float32 squared norms
    metadata: list[dict]  # per row: doc_id, source, token_span, char_span, text, token_ids

    def __len__(self) -> int:
        return len(self.metadata)


def _codecs(compress: bool):
    """A CRC32C over each chunk's stored bytes, so a flipped byte fails the read; zstd before it
    only where it pays: float16 rows are near-incompressible noise, and decoding would be the larger
    part of a query's read time."""
    import zarr

    return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()] if compress else [zarr.codecs.Crc32cCodec()]


class ShardWriter:
    """Append-only writer of one shard (one process, one thread)."""

    def __init__(self, path: Path, row_layout: RowLayout, capacity: int, commit_rows: int):
        import zarr

        self.path, self.layout, self.capacity, self.commit_rows = Path(path), row_layout, capacity, commit_rows
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = metadb.open_env(self.path / layout.META_LMDB, readonly=False, capacity_rows=capacity)
        self.dbs = {name: self.env.open_db(name) for name in
                    (layout.ROWS_DB, layout.DOCS_DB, layout.JOURNAL_DB, layout.INFO_DB)}
        zarr_path = self.path / layout.GRADS_ZARR
        if self.committed == 0:  # nothing to keep: (re)create the arrays from scratch
            shutil.rmtree(zarr_path, ignore_errors=True)
            self._create_arrays(zarr_path)
        self.group = zarr.open_group(str(zarr_path), mode="r+")

    def _create_arrays(self, zarr_path: Path) -> None:
        import zarr

        group = zarr.open_group(str(zarr_path), mode="w")
        cap, unit, dim = self.capacity, self.commit_rows, self.layout.dim
        specs = {
            layout.ROWS: ((cap, dim), (1, dim), "float16"),  # one row per chunk: queries read scattered rows
            layout.SELF_INFLUENCE: ((cap,), (unit,), "float32"),
        }
        for name, (shape, chunks, dtype) in specs.items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                               compressors=_codecs(name != layout.ROWS), fill_value=0)

    def _info(self, key: bytes) -> bytes | None:
        with metadb.read(self.env, db=self.dbs[layout.INFO_DB]) as txn:
            return txn.get(key)

    @property
    def committed(self) -> int:
        value = self._info(b"committed")
        return int(value) if value else 0

    @property
    def sealed(self) -> bool:
        return self._info(b"sealed") is not None

    def append(self, block: RowBlock) -> None:
        """Write a block at the committed end, then commit it (the only way rows appear)."""
        start, n = self.committed, len(block)
        if start + n > self.capacity:
            raise StoreError(f"shard {self.path} is full ({self.capacity} rows)")
        rows = slice(start, start + n)
        for name in layout.ROW_ARRAYS:
            self.group[name][rows] = getattr(block, name)
        metadb.write(self.env, lambda txn: self._record(txn, start, block.metadata))

    def _record(self, txn, start: int, metadata: list[dict]) -> None:
        """One commit unit's rows, document lists, journal entry and committed count (one transaction)."""
        docs = {}
        for offset, meta in enumerate(metadata):
            row = start + offset
            txn.put(layout.row_key(row), json.dumps(meta).encode(), db=self.dbs[layout.ROWS_DB])
            docs.setdefault(meta["doc_id"], []).append(row)
        for doc_id, doc_rows in docs.items():
            key = doc_id.encode()
            previous = txn.get(key, db=self.dbs[layout.DOCS_DB])
            merged = (json.loads(previous) if previous else []) + doc_rows
            txn.put(key, json.dumps(merged).encode(), db=self.dbs[layout.DOCS_DB])
        end = start + len(metadata)
        journal = {"rows_start": start, "rows_end": end, "time": time.time()}
        commit_no = txn.stat(self.dbs[layout.JOURNAL_DB])["entries"]
        txn.put(layout.row_key(commit_no), json.dumps(journal).encode(), db=self.dbs[layout.JOURNAL_DB])
        txn.put(b"committed", str(end).encode(), db=self.dbs[layout.INFO_DB])

    def seal(self, index_kind: str) -> None:
        """Trim the arrays to the committed rows, write the FAISS index, mark sealed."""
        from attribdb.faiss_index import build_index, write_index

        rows = self.committed
        for name in self.group.array_keys():
            array = self.group[name]
            array.resize((rows,) + array.shape[1:])
        vectors = index_vectors(self.group[layout.ROWS][:rows], self.group[layout.SELF_INFLUENCE][:rows],
                                self.layout.normalized_index)
        write_index(build_index(vectors, index_kind, self.layout.normalized_index), self.path / layout.FAISS_FILE)
        metadb.write(self.env, lambda txn: txn.put(b"sealed", str(rows).encode(), db=self.dbs[layout.INFO_DB]))

    def close(self) -> None:
        metadb.close_env(self.env)


class RowChunkFiles:
    """Random row reads of a one-row-per-chunk array straight from its chunk files.

    zarr-python spends about a millisecond of event-loop overhead per chunk, which
    made reading a query's few hundred candidates cost most of its latency; the
    layout is fixed by the Zarr v3 spec (``c/<row>/0`` keys; bytes → [zstd →]
    crc32c codecs), so reading it directly, checksum included, is ten times faster.
    Any other layout falls back to zarr.
    """

    CODEC_CHAINS = (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])

    def __init__(self, array_dir: Path, metadata: dict):
        self.dir = array_dir
        self.dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        self.row_shape = tuple(metadata["shape"][1:])
        self.compressed = any(c["name"] == "zstd" for c in metadata["codecs"])

    @classmethod
    def open(cls, array_dir: Path) -> "RowChunkFiles | None":
        metadata = json.loads((array_dir / "zarr.json").read_text())
        chunks = metadata["chunk_grid"]["configuration"]["chunk_shape"]
        usable = (chunks[0] == 1 and list(chunks[1:]) == metadata["shape"][1:]
                  and [c["name"] for c in metadata["codecs"]] in cls.CODEC_CHAINS
                  and metadata["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                  and metadata["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})
        return cls(array_dir, metadata) if usable else None

    def read(self, rows) -> np.ndarray:
        import google_crc32c
        from numcodecs import Zstd

        zstd = Zstd()
        out = np.empty((len(rows),) + self.row_shape, dtype=self.dtype)
        flat = out.reshape(len(rows), -1)
        prefix = f"{self.dir}/c/"  # plain strings: pathlib's joins cost more than the reads
        for i, row in enumerate(rows):
            path = f"{prefix}{int(row)}/0"
            try:
                with open(path, "rb") as handle:
                    raw = handle.read()
            except FileNotFoundError:
                raise StoreError(f"{path} is missing: the shard is damaged (run attribdb verify)") from None
            body = raw[:-4]
            if google_crc32c.value(body).to_bytes(4, "little") != raw[-4:]:
                raise StoreError(f"{path}: checksum mismatch, the chunk is corrupted (run attribdb verify)")
            flat[i] = np.frombuffer(zstd.decode(body) if self.compressed else body, dtype=self.dtype)
        return out


class ShardReader:
    """Read-only view of a shard: only committed rows are visible."""

    def __init__(self, path: Path, row_layout: RowLayout):
        import zarr

        self.path, self.layout = Path(path), row_layout
        meta_path = self.path / layout.META_LMDB
        if not meta_path.is_dir():
            raise StoreError(f"shard {self.path} has no {layout.META_LMDB}")
        self.env = metadb.open_env(meta_path, readonly=True)
        self.dbs = {name: self.env.open_db(name, create=False) for name in
                    (layout.ROWS_DB, layout.DOCS_DB, layout.JOURNAL_DB, layout.INFO_DB)}
        with metadb.read(self.env, db=self.dbs[layout.INFO_DB]) as txn:
            self.rows = int(txn.get(b"committed") or 0)
            self.sealed = txn.get(b"sealed") is not None
        self._row_files: dict[str, RowChunkFiles | None] = {}
        self._whole: dict[str, np.ndarray] = {}
        try:
            self.group = zarr.open_group(str(self.path / layout.GRADS_ZARR), mode="r")
        except Exception as exc:
            raise StoreError(f"shard {self.path}: cannot open {layout.GRADS_ZARR}: {exc}") from exc

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Committed rows of one array (all of them when ``rows`` is None)."""
        if rows is None:
            return self.group[name][: self.rows]
        if name not in self._row_files:
            self._row_files[name] = RowChunkFiles.open(self.path / layout.GRADS_ZARR / name)
        if self._row_files[name] is not None:
            return self._row_files[name].read(rows)
        array = self.group[name]  # opening an array costs a millisecond: only on the slow path
        return array.get_orthogonal_selection((np.asarray(rows, dtype=np.int64),) + (slice(None),) * (array.ndim - 1))

    def whole(self, name: str) -> np.ndarray:
        """A small per-row array (self-influence) read once and kept: four bytes per row, where
        reading scattered rows through zarr would cost a millisecond per chunk on every query."""
        if name not in self._whole:
            self._whole[name] = self.read(name)
        return self._whole[name]

    def metadata(self, rows) -> list[dict]:
        with metadb.read(self.env, db=self.dbs[layout.ROWS_DB]) as txn:
            out = []
            for row in rows:
                value = txn.get(layout.row_key(int(row)))
                if value is None:
                    raise StoreError(f"shard {self.path}: row {row} has no metadata in {layout.META_LMDB}")
                out.append(json.loads(value))
            return out

    def document_rows(self, doc_id: str) -> list[int]:
        with metadb.read(self.env, db=self.dbs[layout.DOCS_DB]) as txn:
            value = txn.get(doc_id.encode())
        return [r for r in json.loads(value) if r < self.rows] if value else []

    def journal(self) -> list[dict]:
        with metadb.read(self.env, db=self.dbs[layout.JOURNAL_DB]) as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def index(self):
        """The shard's FAISS index; for an unsealed shard, a flat one over its committed rows."""
        from attribdb.faiss_index import build_index, read_index

        if self.sealed:
            return read_index(self.path / layout.FAISS_FILE)
        return build_index(self.faiss_vectors(), "flat", self.layout.normalized_index)

    def faiss_vectors(self) -> np.ndarray:
        """What the shard's FAISS index holds, computed from the Zarr arrays."""
        return index_vectors(self.read(layout.ROWS), self.read(layout.SELF_INFLUENCE), self.layout.normalized_index)

    def close(self) -> None:
        metadb.close_env(self.env)
