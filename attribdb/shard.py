"""One shard: Zarr arrays of rows, LMDB metadata, a full-text index.

A shard is written by exactly one process, in commit units of
``commit_rows`` rows: the unit's row file (attribdb/packed_rows.py: one file
per unit) and its self-influence chunk are written first, then one LMDB
transaction records the rows' metadata, a journal entry and the new committed
count.  Every file is aligned to commit units, so a file that holds committed
rows is never written again, and a kill can only leave garbage in rows that
were never committed, which a resumed build overwrites.  A new shard is made
whole (its LMDB databases and empty arrays) under a temporary name and renamed
into place, so a reader never finds half of one.  Sealing writes the full-text
index once all rows are in; the transaction that marks the shard sealed
records its checksum, so a kill before it leaves a shard that a resume seals
again.  FAISS holds no copy of the rows: a shard is searched from its rows, or
through the database index's codes (attribdb/db_index.py).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attribdb import faults, layout, metadb, packed_rows, records, text_index
from attribdb.errors import StoreError
from attribdb.packed_rows import PackedRows
from attribdb.records import RowRecord
from attribdb.rows import ROW_DTYPE, SELF_INFLUENCE_DTYPE, RowLayout


@dataclass
class RowBlock:
    """A commit unit's computed rows, ready to write (numpy arrays, N rows each)."""

    rows: np.ndarray  # (N, payload_bytes) stored rows (attribdb/rows.py: RowProjection.encode)
    self_influence: np.ndarray  # (N,) their self-influence
    metadata: list[RowRecord]
    checkpoints: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, self-influence) of
    #                                                    the same sequences at checkpoints 1, 2, ... of a trajectory

    def __len__(self) -> int:
        return len(self.metadata)


def row_arrays(row_layout: RowLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape of one row and the dtype of each array of grads.zarr, as the row layout defines
    them: what the writer creates and what a reader checks the stored arrays against (a manifest
    that disagrees with its shards must fail with one line, not deep in a query)."""
    return {layout.ROWS: ((row_layout.payload_bytes,), np.dtype(ROW_DTYPE)),
            layout.SELF_INFLUENCE: ((), np.dtype(SELF_INFLUENCE_DTYPE))}


def _create(path: Path, row_layouts: list[RowLayout], capacity: int, commit_rows: int) -> None:
    """A new, empty shard at ``path``: its LMDB databases and the arrays of every checkpoint's
    row layout, made under a temporary name and renamed into place (a directory there without
    ``meta.lmdb`` holds nothing committed: what a writer killed before this rename left)."""
    made = path.with_name(path.name + ".new")
    for leftover in (made, path):
        shutil.rmtree(leftover, ignore_errors=True)
    made.mkdir(parents=True)
    env = metadb.open_env(made / layout.META_LMDB, readonly=False, capacity_rows=capacity)
    try:
        for name in SHARD_DBS:
            env.open_db(name)
    finally:
        metadb.close_env(env)
    for checkpoint, row_layout in enumerate(row_layouts):
        _create_row_store(made / layout.grads_zarr(checkpoint), row_layout, capacity, commit_rows)
    os.rename(made, path)


def _create_row_store(path: Path, row_layout: RowLayout, capacity: int, commit_rows: int) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    (row_shape, dtype), (_, scalar) = row_arrays(row_layout).values()
    packed_rows.create(group, layout.ROWS, capacity, row_shape, commit_rows, dtype)
    # one chunk per commit unit; zstd before the CRC32C pays here (the payloads are near-incompressible codes)
    group.create_array(layout.SELF_INFLUENCE, shape=(capacity,), chunks=(commit_rows,), dtype=scalar, fill_value=0,
                       compressors=[zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()])


SHARD_DBS = (layout.ROWS_DB, layout.DOCS_DB, layout.JOURNAL_DB, layout.INFO_DB)
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
    """Append-only writer of one shard (one process, one thread).  A trajectory database's shard
    holds one row store per checkpoint (``checkpoint_layouts``: checkpoints 1, 2, ...) beside the
    model's, all written before the LMDB transaction that commits a unit's rows."""

    def __init__(self, path: Path, row_layout: RowLayout, capacity: int, commit_rows: int,
                 checkpoint_layouts: tuple[RowLayout, ...] = ()):
        import zarr

        self.path, self.layout, self.capacity, self.commit_rows = Path(path), row_layout, capacity, commit_rows
        if not (self.path / layout.META_LMDB).is_dir():
            _create(self.path, [row_layout, *checkpoint_layouts], capacity, commit_rows)
        self.env = metadb.open_env(self.path / layout.META_LMDB, readonly=False, capacity_rows=capacity)
        self.dbs = {name: self.env.open_db(name) for name in SHARD_DBS}
        self.stores = []  # (zarr group, packed rows) per checkpoint
        for checkpoint in range(1 + len(checkpoint_layouts)):
            zarr_path = self.path / layout.grads_zarr(checkpoint)
            self.stores.append((zarr.open_group(str(zarr_path), mode="r+"), PackedRows.open(zarr_path / layout.ROWS)))
            found = (self.stores[-1][1].capacity, self.stores[-1][1].unit)
            if found != (capacity, commit_rows):
                raise StoreError(f"shard {self.path} holds {found[0]} rows in units of {found[1]}, this build writes "
                                 f"{capacity} in units of {commit_rows}: the shard is damaged")

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
        arrays = [(block.rows, block.self_influence), *block.checkpoints]
        if len(arrays) != len(self.stores):
            raise StoreError(f"shard {self.path} holds rows of {len(self.stores)} checkpoints; this block has "
                             f"{len(arrays)}")
        for (group, row_files), (rows, self_influence) in zip(self.stores, arrays):
            row_files.write(start, rows)
            group[layout.SELF_INFLUENCE][start:start + n] = self_influence
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

    def seal(self) -> None:
        """Write the full-text index of the committed rows, then mark the shard sealed."""
        rows = self.committed
        text_index.write(row_texts(self.env, self.dbs[layout.ROWS_DB], f"shard {self.path}", rows),
                         self.path / layout.TEXT_FILE)
        checksum = file_crc32c(self.path / layout.TEXT_FILE)
        faults.point("indexes-written")

        def mark_sealed(txn) -> None:
            txn.put(TEXT_CRC_KEY, checksum, db=self.dbs[layout.INFO_DB])
            txn.put(b"sealed", str(rows).encode(), db=self.dbs[layout.INFO_DB])

        metadb.write(self.env, mark_sealed)
        faults.point("shard-sealed")

    def close(self) -> None:
        metadb.close_env(self.env)


class ShardReader:
    """Read-only view of a shard: only committed rows are visible.  It reads the row store of one
    checkpoint (0: the database's model); :meth:`view` gives another checkpoint's on the same
    LMDB environment, which a process must not open twice."""

    def __init__(self, path: Path, row_layout: RowLayout, checkpoint: int = 0, shared: "ShardReader | None" = None):
        """``shared``: a reader of the same shard whose LMDB environment and counts this one uses."""
        self.path, self.layout, self.grads = Path(path), row_layout, layout.grads_zarr(checkpoint)
        self.owns_env = shared is None
        if shared is not None:
            self.env, self.dbs, self.rows, self.sealed, self.text_crc = (shared.env, shared.dbs, shared.rows,
                                                                         shared.sealed, shared.text_crc)
        else:
            self._open_env()
        self._whole: dict[str, np.ndarray] = {}
        self.group, self.row_files = None, None
        if self.rows:  # nothing committed: nothing to read (and the arrays may be a resumed writer's to remake)
            self._open_arrays()

    def _open_env(self) -> None:
        meta_path = self.path / layout.META_LMDB
        if not meta_path.is_dir():
            raise StoreError(f"shard {self.path} has no {layout.META_LMDB}")
        self.env = metadb.open_env(meta_path, readonly=True)
        try:
            with lmdb_errors(f"shard {self.path}"):
                self.dbs = {name: self.env.open_db(name, create=False) for name in SHARD_DBS}
                with metadb.read(self.env, db=self.dbs[layout.INFO_DB]) as txn:
                    committed, sealed, self.text_crc = (txn.get(key) for key in
                                                        (b"committed", b"sealed", TEXT_CRC_KEY))
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

    def view(self, checkpoint: int, row_layout: RowLayout) -> "ShardReader":
        """This shard read through checkpoint ``checkpoint``'s row store, sharing this reader's
        LMDB environment (closing the view leaves it open)."""
        return ShardReader(self.path, row_layout, checkpoint, shared=self)

    def _open_arrays(self) -> None:
        """Open the row store and check its arrays against the row layout."""
        import zarr

        shapes, where = {}, self.grads
        try:
            self.group = zarr.open_group(str(self.path / self.grads), mode="r")
            for name in row_arrays(self.layout):
                where = f"{self.grads}/{name}"
                shapes[name] = self.group[name].shape
            self.row_files = PackedRows.open(self.path / self.grads / layout.ROWS)
        except StoreError:
            self.close()
            raise
        except Exception as exc:  # zarr and json raise many types on damaged metadata
            self.close()
            reason = (str(exc).splitlines() or [""])[0][:120]
            raise StoreError(f"shard {self.path}: cannot open {where} ({type(exc).__name__}: {reason})") from None
        for name, (row_shape, _) in row_arrays(self.layout).items():
            if shapes[name][1:] != row_shape or shapes[name][0] < self.rows:
                self.close()
                raise StoreError(f"shard {self.path}: {name} holds rows of shape {shapes[name]}, the manifest "
                                 f"describes {self.rows} rows of {row_shape}: manifest and shard disagree")

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Committed rows of one array (all of them when ``rows`` is None); whatever zarr raises on
        damaged metadata or chunks, and a chunk file that is missing (zarr would read its fill value,
        zeros, as if they were data), is a StoreError naming the shard and array."""
        if not self.rows:
            row_shape, dtype = row_arrays(self.layout)[name]
            return np.zeros((0,) + row_shape, dtype=dtype)
        try:
            return self._read(name, rows)
        except StoreError:
            raise
        except Exception as exc:  # zarr, numcodecs and json raise many types on damaged files
            reason = (str(exc).splitlines() or [""])[0][:120]
            raise StoreError(f"shard {self.path}: {self.grads}/{name} cannot be read "
                             f"({type(exc).__name__}: {reason})") from None

    def _require_chunks(self, name: str, chunk_indices) -> None:
        for index in chunk_indices:
            path = self.path / self.grads / name / "c" / f"{int(index)}"
            if not path.is_file():
                raise StoreError(f"{path} is missing: the shard is damaged (run attribdb verify)")

    def _read(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        if name == layout.ROWS:  # packed rows, read directly (attribdb/packed_rows.py)
            return self.row_files.read(np.arange(self.rows) if rows is None else rows)
        array = self.group[name]  # opening an array costs a millisecond: only for the small arrays
        if rows is None:
            self._require_chunks(name, range(-(-self.rows // array.chunks[0])))
            return array[: self.rows]
        rows = np.asarray(rows, dtype=np.int64)
        self._require_chunks(name, np.unique(rows // array.chunks[0]))
        return array.get_orthogonal_selection(rows)

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

    @property
    def has_text_index(self) -> bool:
        """Whether the seal stored a full-text index (shards sealed before attribdb indexed text have none)."""
        return self.sealed and self.text_crc is not None

    def text_index(self) -> text_index.TextIndex:
        """The shard's full-text index; for a shard without one (unsealed, or sealed before attribdb
        indexed text), one built in memory from its committed rows' text."""
        if not self.has_text_index:
            return self.fresh_text_index()
        index = text_index.TextIndex.open(self._sealed_file(layout.TEXT_FILE, self.text_crc))
        if index.rows != self.rows:
            index.close()
            raise StoreError(f"{self.path / layout.TEXT_FILE} holds {index.rows} rows for {self.rows} committed "
                             "rows: the shard is damaged")
        return index

    def fresh_text_index(self) -> text_index.TextIndex:
        """A full-text index of the committed rows' text, built in memory now."""
        where = f"shard {self.path}"
        return text_index.TextIndex.in_memory(row_texts(self.env, self.dbs[layout.ROWS_DB], where, self.rows), where)

    def faiss_vectors(self, projection, rows: np.ndarray | None = None) -> np.ndarray:
        """What FAISS searches for these rows (default all): their sketches, made by ``projection``
        from their payloads (attribdb.rows.RowProjection.index_vectors)."""
        rows = np.arange(self.rows) if rows is None else rows
        return projection.index_vectors(self.read(layout.ROWS, rows), self.whole(layout.SELF_INFLUENCE)[rows])

    def close(self) -> None:
        if self.owns_env:
            metadb.close_env(self.env)
