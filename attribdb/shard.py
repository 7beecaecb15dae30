"""One shard: Zarr arrays of compressed gradients, LMDB metadata, a FAISS index.

A shard is written by exactly one process, in commit units of
``commit_rows`` rows: the unit's Zarr chunks are written first, then one LMDB
transaction records the rows' metadata, a journal entry and the new committed
count.  Every Zarr chunk is aligned to commit units (the low-rank array has
one row per chunk, for random reads), so a chunk is written once and a kill
can only leave garbage in rows that were never committed, which a resumed
build overwrites.  Sealing builds the FAISS index and the full-text index once
all rows are in; the transaction that marks the shard sealed records both
files' checksums, so a kill before it leaves a shard that a resume seals again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribdb import faults, layout, metadb, records, text_index
from attribdb.errors import StoreError
from attribdb.records import RowRecord
from attribdb.rows import ROW_DTYPE, SELF_INFLUENCE_DTYPE, RowLayout, index_vectors


@dataclass
class RowBlock:
    """A commit unit's computed rows, ready to write (numpy arrays, N rows each)."""

    rows: np.ndarray  # (N, dim) stored rows (attribdb/rows.py: to_stored)
    self_influence: np.ndarray  # (N,) squared norms
    metadata: list[RowRecord]

    def __len__(self) -> int:
        return len(self.metadata)


def row_shapes(row_layout: RowLayout) -> dict[str, tuple[int, ...]]:
    """The shape of one row in each array of grads.zarr, as the row layout defines it: what the
    writer creates and what a reader checks the stored arrays against (a manifest that disagrees
    with its shards must fail with one line, not deep in a query)."""
    return {layout.ROWS: (row_layout.dim,), layout.SELF_INFLUENCE: ()}


def _codecs(compress: bool):
    """A CRC32C over each chunk's stored bytes, so a flipped byte fails the read; zstd before it
    only where it pays: stored rows are near-incompressible noise, and decoding would be the larger
    part of a query's read time."""
    import zarr

    return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()] if compress else [zarr.codecs.Crc32cCodec()]


FAISS_CRC_KEY = b"faiss_crc32c"  # info key: CRC32C of rows.faiss, written when the shard is sealed
TEXT_CRC_KEY = b"text_crc32c"  # info key: CRC32C of text.sqlite, written when the shard is sealed
lmdb_errors = metadb.lmdb_errors  # LMDB's own exceptions as a one-line StoreError naming the shard


def file_crc32c(path: Path) -> bytes:
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(block)
    return checksum.digest().hex().encode()


def row_texts(env, rows_db, where: str, rows: int):
    """(row, text) of the first ``rows`` rows, from their checksummed LMDB records: what the
    full-text index holds."""
    with lmdb_errors(where), metadb.read(env, db=rows_db) as txn:
        for key, value in txn.cursor():
            row = int.from_bytes(key, "big")
            if row >= rows:
                break
            yield row, RowRecord.from_bytes(bytes(key), value, f"{where} row {row}").text


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
        self.row_files = RowChunkFiles.open(zarr_path / layout.ROWS)
        if self.row_files is None:
            raise StoreError(f"shard {self.path}: {layout.GRADS_ZARR}/{layout.ROWS} has a chunk layout this "
                             "writer did not make: rebuild the database")

    def _create_arrays(self, zarr_path: Path) -> None:
        import zarr

        group = zarr.open_group(str(zarr_path), mode="w")
        cap, unit, dim = self.capacity, self.commit_rows, self.layout.dim
        specs = {
            layout.ROWS: ((cap, dim), (1, dim), ROW_DTYPE),  # one row per chunk: queries read scattered rows
            layout.SELF_INFLUENCE: ((cap,), (unit,), SELF_INFLUENCE_DTYPE),
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

    def append(self, block: RowBlock, start: int) -> None:
        """Write a block at its own first row ``start``, then commit it (the only way rows appear).

        ``start`` comes from the caller (the unit's place in the shard), never from re-reading the
        committed count: a block is refused unless it continues the committed rows exactly, checked
        again inside the LMDB write transaction (which LMDB serialises across processes), so even two
        writers that both lost the database lock cannot interleave or duplicate rows."""
        n = len(block)
        self._require_next(start, self.committed)
        if start + n > self.capacity:
            raise StoreError(f"shard {self.path} is full ({self.capacity} rows)")
        self.row_files.write(start, block.rows)
        self.group[layout.SELF_INFLUENCE][start:start + n] = block.self_influence
        faults.point("unit-written")
        metadb.write(self.env, lambda txn: self._record(txn, start, block.metadata))
        faults.point("unit-committed")

    def _record(self, txn, start: int, metadata: list[RowRecord]) -> None:
        """One commit unit's rows, document lists, journal entry and committed count (one transaction,
        rerun whole by metadb.write if the map had to grow); every value a checksummed record."""
        self._require_next(start, int(txn.get(b"committed", db=self.dbs[layout.INFO_DB]) or 0))
        docs = {}
        for offset, meta in enumerate(metadata):
            row = start + offset
            key = layout.row_key(row)
            txn.put(key, meta.to_bytes(key), db=self.dbs[layout.ROWS_DB])
            docs.setdefault(meta.doc_id, []).append(row)
        for doc_id, doc_rows in docs.items():
            key = doc_id.encode()
            previous = txn.get(key, db=self.dbs[layout.DOCS_DB])
            merged = (records.unpack(key, previous, f"shard {self.path} document {doc_id!r}")
                      if previous else []) + doc_rows
            txn.put(key, records.pack(key, merged), db=self.dbs[layout.DOCS_DB])
        end = start + len(metadata)
        journal = {"rows_start": start, "rows_end": end, "time": time.time()}
        commit_key = layout.row_key(txn.stat(self.dbs[layout.JOURNAL_DB])["entries"])
        txn.put(commit_key, records.pack(commit_key, journal), db=self.dbs[layout.JOURNAL_DB])
        txn.put(b"committed", str(end).encode(), db=self.dbs[layout.INFO_DB])

    def _require_next(self, start: int, committed: int) -> None:
        if start != committed:
            raise StoreError(f"shard {self.path}: refusing to write rows from {start} when it has committed "
                             f"{committed}: another process is writing this database")

    def seal(self, index_kind: str) -> None:
        """Trim the arrays to the committed rows, write the FAISS and full-text indexes, mark sealed."""
        from attribdb.faiss_index import build_index, write_index
        from attribdb.index_kinds import shard_index_kind

        rows = self.committed
        for name in self.group.array_keys():
            array = self.group[name]
            array.resize((rows,) + array.shape[1:])
        vectors = index_vectors(self.row_files.read(range(rows)), self.group[layout.SELF_INFLUENCE][:rows],
                                self.layout.normalized_index)
        write_index(build_index(vectors, shard_index_kind(index_kind), self.layout.index_in_row_dtype),
                    self.path / layout.FAISS_FILE)
        text_index.write(row_texts(self.env, self.dbs[layout.ROWS_DB], f"shard {self.path}", rows),
                         self.path / layout.TEXT_FILE)
        checksums = {FAISS_CRC_KEY: file_crc32c(self.path / layout.FAISS_FILE),
                     TEXT_CRC_KEY: file_crc32c(self.path / layout.TEXT_FILE)}
        faults.point("indexes-written")

        def mark_sealed(txn) -> None:
            for key, crc in checksums.items():
                txn.put(key, crc, db=self.dbs[layout.INFO_DB])
            txn.put(b"sealed", str(rows).encode(), db=self.dbs[layout.INFO_DB])

        metadb.write(self.env, mark_sealed)
        faults.point("shard-sealed")

    def close(self) -> None:
        metadb.close_env(self.env)


class RowChunkFiles:
    """Random row reads (and the build's writes) of a one-row-per-chunk array straight from
    (to) its chunk files.

    zarr-python spends about a millisecond of event-loop overhead per chunk, which
    made reading a query's few hundred candidates cost most of its latency, and
    writing them most of a small model's build time; the
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

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start, start + 1, ...`` as chunk files of an uncompressed array, each as zarr
        would write it (and also when a row is all zeros, which zarr would leave out as its fill
        value, and a reader would then refuse as missing)."""
        import google_crc32c

        assert not self.compressed, "rows are written uncompressed (see _codecs)"
        for offset, value in enumerate(np.ascontiguousarray(values, dtype=self.dtype)):
            body = value.tobytes()
            folder = f"{self.dir}/c/{start + offset}"
            os.makedirs(folder, exist_ok=True)
            with open(f"{folder}/0", "wb") as handle:
                handle.write(body + google_crc32c.value(body).to_bytes(4, "little"))

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
        try:
            with lmdb_errors(f"shard {self.path}"):
                self.dbs = {name: self.env.open_db(name, create=False) for name in
                            (layout.ROWS_DB, layout.DOCS_DB, layout.JOURNAL_DB, layout.INFO_DB)}
                with metadb.read(self.env, db=self.dbs[layout.INFO_DB]) as txn:
                    committed, sealed, self._faiss_crc, self._text_crc = (
                        txn.get(key) for key in (b"committed", b"sealed", FAISS_CRC_KEY, TEXT_CRC_KEY))
            self.rows, self.sealed = int(committed or 0), sealed is not None
            if sealed is not None and int(sealed) != self.rows:
                raise StoreError(f"shard {self.path}: {self.rows} rows committed but {int(sealed)} sealed: "
                                 f"its {layout.META_LMDB} is damaged")
        except ValueError:
            metadb.close_env(self.env)
            raise StoreError(f"shard {self.path}: its row counts (committed {committed!r}, sealed {sealed!r}) are not "
                             f"numbers: its {layout.META_LMDB} is damaged") from None
        except StoreError:
            metadb.close_env(self.env)
            raise
        self._row_files: dict[str, RowChunkFiles | None] = {}
        self._whole: dict[str, np.ndarray] = {}
        shapes, where = {}, layout.GRADS_ZARR
        try:
            self.group = zarr.open_group(str(self.path / layout.GRADS_ZARR), mode="r")
            for name in row_shapes(row_layout):
                where = f"{layout.GRADS_ZARR}/{name}"
                shapes[name] = self.group[name].shape
        except Exception as exc:  # zarr and json raise many types on damaged metadata
            self.close()
            reason = (str(exc).splitlines() or [""])[0][:120]
            raise StoreError(f"shard {self.path}: cannot open {where} ({type(exc).__name__}: {reason})") from None
        for name, row_shape in row_shapes(row_layout).items():
            if shapes[name][1:] != row_shape or shapes[name][0] < self.rows:
                self.close()
                raise StoreError(f"shard {self.path}: {name} holds rows of shape {shapes[name]}, the manifest "
                                 f"describes {self.rows} rows of {row_shape}: manifest and shard disagree")

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Committed rows of one array (all of them when ``rows`` is None); whatever zarr raises on
        damaged metadata or chunks, and a chunk file that is missing (zarr would read its fill value,
        zeros, as if they were data), is a StoreError naming the shard and array."""
        try:
            return self._read(name, rows)
        except StoreError:
            raise
        except Exception as exc:  # zarr, numcodecs and json raise many types on damaged files
            reason = (str(exc).splitlines() or [""])[0][:120]
            raise StoreError(f"shard {self.path}: {layout.GRADS_ZARR}/{name} cannot be read "
                             f"({type(exc).__name__}: {reason})") from None

    def _require_chunks(self, name: str, array, chunk_indices) -> None:
        tail = "/0" * (array.ndim - 1)
        for index in chunk_indices:
            path = self.path / layout.GRADS_ZARR / name / "c" / f"{int(index)}{tail}"
            if not path.is_file():
                raise StoreError(f"{path} is missing: the shard is damaged (run attribdb verify)")

    def _read(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        if rows is None:
            array = self.group[name]
            self._require_chunks(name, array, range(-(-self.rows // array.chunks[0])))
            return array[: self.rows]
        if name not in self._row_files:
            self._row_files[name] = RowChunkFiles.open(self.path / layout.GRADS_ZARR / name)
        if self._row_files[name] is not None:
            return self._row_files[name].read(rows)
        array = self.group[name]  # opening an array costs a millisecond: only on the slow path
        self._require_chunks(name, array, np.unique(np.asarray(rows, dtype=np.int64) // array.chunks[0]))
        return array.get_orthogonal_selection((np.asarray(rows, dtype=np.int64),) + (slice(None),) * (array.ndim - 1))

    def whole(self, name: str) -> np.ndarray:
        """A small per-row array (self-influence) read once and kept: four bytes per row, where
        reading scattered rows through zarr would cost a millisecond per chunk on every query."""
        if name not in self._whole:
            self._whole[name] = self.read(name)
        return self._whole[name]

    def metadata(self, rows) -> list[RowRecord]:
        with lmdb_errors(f"shard {self.path}"), metadb.read(self.env, db=self.dbs[layout.ROWS_DB]) as txn:
            out = []
            for row in rows:
                key = layout.row_key(int(row))
                value = txn.get(key)
                if value is None:
                    raise StoreError(f"shard {self.path}: row {row} has no metadata in {layout.META_LMDB}")
                out.append(RowRecord.from_bytes(key, value, f"shard {self.path} row {row}"))
            return out

    def document_rows(self, doc_id: str) -> list[int]:
        key = doc_id.encode()
        with lmdb_errors(f"shard {self.path}"), metadb.read(self.env, db=self.dbs[layout.DOCS_DB]) as txn:
            value = txn.get(key)
        rows = records.unpack(key, value, f"shard {self.path} document {doc_id!r}") if value else []
        return [r for r in rows if r < self.rows]

    def journal(self) -> list[dict]:
        with lmdb_errors(f"shard {self.path}"), metadb.read(self.env, db=self.dbs[layout.JOURNAL_DB]) as txn:
            return [records.unpack(bytes(k), v, f"shard {self.path} journal entry {int.from_bytes(k, 'big')}")
                    for k, v in txn.cursor()]

    def _sealed_file(self, name: str, crc: bytes | None) -> Path:
        """A file the seal wrote, present and passing the checksum the seal recorded."""
        path = self.path / name
        if not path.is_file():
            raise StoreError(f"{path} is missing: the shard is damaged")
        if crc is not None and file_crc32c(path) != bytes(crc):
            raise StoreError(f"{path} fails its checksum: the index is damaged")
        return path

    def index(self):
        """The shard's FAISS index; for an unsealed shard, a flat one over its committed rows."""
        from attribdb.faiss_index import build_index, read_index

        if not self.sealed:
            return build_index(self.faiss_vectors(), "flat", self.layout.index_in_row_dtype)
        path = self._sealed_file(layout.FAISS_FILE, self._faiss_crc)
        try:
            index = read_index(path)
        except RuntimeError as exc:
            raise StoreError(f"{path} cannot be read: {str(exc).splitlines()[0][:120]}") from None
        if index.ntotal != self.rows:
            raise StoreError(f"{path} holds {index.ntotal} vectors for {self.rows} committed rows: "
                             "the shard is damaged")
        return index

    @property
    def has_text_index(self) -> bool:
        """Whether the seal stored a full-text index (shards sealed before attribdb indexed text have none)."""
        return self.sealed and self._text_crc is not None

    def text_index(self) -> text_index.TextIndex:
        """The shard's full-text index; for a shard without one (unsealed, or sealed before attribdb
        indexed text), one built in memory from its committed rows' text, as FAISS is for unsealed shards."""
        if not self.has_text_index:
            return self.fresh_text_index()
        index = text_index.TextIndex.open(self._sealed_file(layout.TEXT_FILE, self._text_crc))
        if index.rows != self.rows:
            index.close()
            raise StoreError(f"{self.path / layout.TEXT_FILE} holds {index.rows} rows for {self.rows} committed "
                             "rows: the shard is damaged")
        return index

    def fresh_text_index(self) -> text_index.TextIndex:
        """A full-text index of the committed rows' text, built in memory now."""
        where = f"shard {self.path}"
        return text_index.TextIndex.in_memory(row_texts(self.env, self.dbs[layout.ROWS_DB], where, self.rows), where)

    def faiss_vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """What the shard's FAISS index holds (of ``rows``, default all), computed from the Zarr arrays."""
        rows = np.arange(self.rows) if rows is None else rows
        return index_vectors(self.read(layout.ROWS, rows), self.whole(layout.SELF_INFLUENCE)[rows],
                             self.layout.normalized_index)

    def close(self) -> None:
        metadb.close_env(self.env)
