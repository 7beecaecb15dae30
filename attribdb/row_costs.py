"""What a row costs on disk all-in, and so what its vector may take of ``--row-bytes``.

``--row-bytes`` is the whole cost of one training sequence: its row in the row store (the
float16 vector and its float32 squared norm, attribdb/rows.py), its codes and id in the database
index (attribdb/db_index.py), and its metadata (its LMDB record of text, token ids and spans, and
its share of the full-text index), estimated from ``max_length``.  The vector gets what the
others leave.  A database without a database index reserves the codes all the same: a row's
layout is fixed when the factors are fitted, before anyone knows how large the database will grow.
``attribdb plan`` prints :func:`row_cost` before a build and ``attribdb info`` of the database after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribdb.errors import ConfigError
from attribdb.rows import ROW_DTYPE, SELF_INFLUENCE_DTYPE

# Measured on the demo model's database of 26,279 windows of 128 tokens of English: LMDB 1,692 bytes
# per row on disk (its record, the document index, the journal and B-tree pages), text.sqlite 192:
# 14.7 bytes per token
METADATA_BYTES_PER_TOKEN = 16
NORM_BYTES = np.dtype(SELF_INFLUENCE_DTYPE).itemsize  # the squared norm beside each row (RowLayout.bytes_per_row)


@dataclass(frozen=True)
class RowCost:
    """Bytes one row costs, by where they lie."""

    row_store: int  # the row vector and its squared norm
    codes: int  # the database index's codes and id
    metadata: int  # the estimate of its LMDB record and full-text entry

    @property
    def total(self) -> int:
        return self.row_store + self.codes + self.metadata

    def to_dict(self) -> dict:
        return {"row_store": self.row_store, "codes": self.codes, "metadata": self.metadata, "total": self.total}


def metadata_bytes(max_length: int) -> int:
    return METADATA_BYTES_PER_TOKEN * max_length


def row_cost(row_layout, max_length: int) -> RowCost:
    from attribdb.db_index import code_bytes

    return RowCost(row_layout.bytes_per_row, code_bytes(row_layout.dim), metadata_bytes(max_length))


def check_room(row_bytes: int, max_length: int) -> None:
    """Refuse a budget that the metadata alone would fill (the codes are checked by the fit, which
    needs FAISS to price them: :func:`row_store_budget`)."""
    if row_bytes - NORM_BYTES - metadata_bytes(max_length) < np.dtype(ROW_DTYPE).itemsize:
        raise _no_room(row_bytes, max_length)


def _no_room(row_bytes: int, max_length: int) -> ConfigError:
    return ConfigError(f"row-bytes {row_bytes} leaves no room for a row: its metadata at max-length {max_length} "
                       f"({metadata_bytes(max_length)} bytes) and index codes need more; raise --row-bytes")


def row_store_budget(row_bytes: int, max_length: int) -> int:
    """The most bytes a row may take in the row store (what attribdb.rows lays a row out under) for
    it to cost at most ``row_bytes`` all-in."""
    from attribdb.db_index import code_bytes

    itemsize = np.dtype(ROW_DTYPE).itemsize
    left = row_bytes - NORM_BYTES - metadata_bytes(max_length)

    def fits(dim: int) -> bool:
        return itemsize * dim + code_bytes(dim) <= left

    low, high = 0, max(0, left // itemsize)  # the largest dim that fits lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    if low == 0:
        raise _no_room(row_bytes, max_length)
    return itemsize * low + NORM_BYTES
