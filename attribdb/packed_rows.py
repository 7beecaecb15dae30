"""The rows array of a shard's row store: one file per commit unit, every row CRC32C-checked.

A one-row-per-file array made 10⁶ rows 10⁶ files (and a file-system block each).  Here the array is
a Zarr v3 array with the sharding codec: a Zarr *shard* (one file, ``c/<unit>/0``) holds one commit
unit's rows, each row an inner chunk with its own CRC32C (codecs ``bytes``, ``crc32c``), followed by
the shard's index of (offset, length) per row and the index's own CRC32C.  zarr reads the array
as it reads any other (the tests check it); this module writes and reads it directly, because
zarr costs about a millisecond of event-loop work per chunk, and because a Zarr 3 write of part of
a shard reads, modifies and rewrites the whole file in place.

Crash safety: a unit's file is written whole, under a temporary name renamed into place, *before*
the LMDB transaction that commits its rows (attribdb/shard.py).  So a file that holds committed rows
is never written again; a kill leaves at most a file of rows that were never committed, which the
resumed build replaces the same way; and a reader, which reads committed rows only, never sees a
file change under it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from attribdb.errors import StoreError

EMPTY = np.uint64(2 ** 64 - 1)  # a shard index entry for an absent chunk (past the array's end)
CRC_BYTES = 4
ENTRY = np.dtype("<u8")  # the shard index: (offset, length) per inner chunk, little-endian
CRC32C = {"name": "crc32c"}
LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
BYTES = {"name": "bytes"}  # what zarr writes for one-byte values, which have no byte order
WHOLE_FILE_SHARE = 4  # reading more than 1/4 of a unit's rows reads its file in one call


def _crc(data) -> bytes:
    import google_crc32c

    return google_crc32c.value(data).to_bytes(CRC_BYTES, "little")


def create(group, name: str, capacity: int, row_shape: tuple[int, ...], unit: int, dtype) -> "PackedRows":
    """A new packed array of ``capacity`` rows of ``row_shape`` in ``group``, ``unit`` rows per file."""
    import zarr

    group.create_array(name, shape=(capacity,) + row_shape, chunks=(1,) + row_shape, shards=(unit,) + row_shape,
                       dtype=dtype, compressors=[zarr.codecs.Crc32cCodec()], fill_value=0)
    return PackedRows.open(Path(group.store.root) / group.path / name)


class PackedRows:
    """Rows of one packed array, written one commit unit at a time and read one row or many."""

    def __init__(self, array_dir: Path, metadata: dict):
        sharding = metadata["codecs"][0]["configuration"]
        self.dir = str(array_dir)
        self.dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        self.capacity = metadata["shape"][0]
        self.row_shape = tuple(metadata["shape"][1:])
        self.unit = metadata["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunk_bytes = self.row_bytes + CRC_BYTES
        self.index_bytes = self.unit * 2 * ENTRY.itemsize + CRC_BYTES
        assert sharding["chunk_shape"] == [1, *self.row_shape]

    @classmethod
    def open(cls, array_dir: Path) -> "PackedRows":
        """The array at ``array_dir``; a StoreError naming it when its zarr.json is not the layout
        :func:`create` makes (a database of another format, or damaged metadata)."""
        path = Path(array_dir) / "zarr.json"
        try:
            metadata = json.loads(path.read_text())
            sharding = metadata["codecs"][0]
            config = sharding["configuration"]
            usable = (sharding["name"] == "sharding_indexed" and len(metadata["codecs"]) == 1
                      and config["chunk_shape"] == [1, *metadata["shape"][1:]]
                      and metadata["chunk_grid"]["configuration"]["chunk_shape"][1:] == metadata["shape"][1:]
                      and config["codecs"] in ([LITTLE, CRC32C], [BYTES, CRC32C])  # BYTES: one-byte values
                      and config["index_codecs"] == [LITTLE, CRC32C]
                      and config.get("index_location", "end") == "end"
                      and metadata["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the shard is damaged (run attribdb verify)") from None
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise StoreError(f"{path} cannot be read ({type(exc).__name__}): the shard is damaged") from None
        if not usable:
            raise StoreError(f"{path} describes a chunk layout this attribdb did not write: rebuild the database")
        return cls(Path(array_dir), metadata)

    def _file(self, unit: int) -> str:
        return f"{self.dir}/c/{unit}/0"  # plain strings: pathlib's joins cost more than the reads

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start, start + 1, ...``: one whole commit unit (the last one may be short, at the
        array's end), as a new file renamed into place."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        n = len(values)
        if start % self.unit or n != min(self.unit, self.capacity - start):
            raise StoreError(f"{self.dir}: rows {start}..{start + n} are not one commit unit of {self.unit} rows")
        index = np.full((self.unit, 2), EMPTY, dtype=ENTRY)
        index[:n, 0] = np.arange(n, dtype=np.uint64) * self.chunk_bytes
        index[:n, 1] = self.chunk_bytes
        parts = []
        for value in values:
            body = value.tobytes()
            parts += [body, _crc(body)]
        table = index.tobytes()
        path = self._file(start // self.unit)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as handle:
            handle.write(b"".join(parts + [table, _crc(table)]))
        os.replace(path + ".tmp", path)

    def read(self, rows) -> np.ndarray:
        """(len(rows), *row_shape) rows in the order asked, each checked against its CRC32C."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.row_shape, dtype=self.dtype)
        flat = out.reshape(len(rows), -1)
        units = rows // self.unit
        order = np.argsort(units, kind="stable")
        bounds = np.flatnonzero(np.diff(units[order])) + 1
        for positions in np.split(order, bounds) if len(rows) else []:
            self._read_unit(int(units[positions[0]]), rows[positions], positions, flat)
        return out

    def _read_unit(self, unit: int, rows: np.ndarray, positions: np.ndarray, flat: np.ndarray) -> None:
        path = self._file(unit)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the shard is damaged (run attribdb verify)") from None
        try:
            size = os.fstat(fd).st_size
            table = os.pread(fd, self.index_bytes, size - self.index_bytes) if size >= self.index_bytes else b""
            if len(table) != self.index_bytes or _crc(table[:-CRC_BYTES]) != table[-CRC_BYTES:]:
                raise StoreError(f"{path}: its row index fails its checksum, the file is corrupted "
                                 "(run attribdb verify)")
            entries = np.frombuffer(table[:-CRC_BYTES], dtype=ENTRY).reshape(self.unit, 2)
            local = rows - unit * self.unit
            wanted = entries[local]
            data_end = size - self.index_bytes
            bad = (wanted[:, 1] != self.chunk_bytes) | (wanted[:, 0] > data_end - self.chunk_bytes)
            if bad.any():
                raise StoreError(f"{path}: row {rows[np.argmax(bad)]} is not in it: the file is damaged "
                                 "(run attribdb verify)")
            whole = len(rows) * WHOLE_FILE_SHARE > self.unit
            data = os.pread(fd, data_end, 0) if whole else None
            for row, (offset, _), at in zip(rows, wanted, positions):
                chunk = data[offset:offset + self.chunk_bytes] if whole else os.pread(fd, self.chunk_bytes, int(offset))
                body = chunk[:self.row_bytes]
                if len(chunk) != self.chunk_bytes or _crc(body) != chunk[self.row_bytes:]:
                    raise StoreError(f"{path}: checksum mismatch in row {row}, the file is corrupted "
                                     "(run attribdb verify)")
                flat[at] = np.frombuffer(body, dtype=self.dtype)
        finally:
            os.close(fd)
