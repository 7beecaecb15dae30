"""What a row costs on disk all-in, and so what its payload may take of ``--row-bytes``.

``--row-bytes`` is the whole cost of one training sequence: its row in the row store (the
payload of 4-bit factors and its float32 self-influence, attribdb/rows.py), its codes and id in
the database index (attribdb/db_index.py: codes of the row's sketch, whose width is fixed), and
its metadata (its LMDB record of text, token ids and spans, and its share of the full-text
index), estimated from ``max_length``.  The payload gets what the others leave.  A database
without a database index reserves the codes all the same: a row's layout is fixed when the
factors are fitted, before anyone knows how large the database will grow.  ``attribdb plan``
prints :func:`planned_cost` before a build and ``attribdb info`` prints :func:`row_cost` of the
database after; the two agree because every part's size is fixed by the budget.

A trajectory database (C checkpoints) stores a sequence's metadata once and, per checkpoint, a
row and its codes.  ``--row-bytes`` stays the whole cost of a sequence: the metadata is taken
first and each checkpoint gets an equal share of the rest for its row and codes, so a database of
C checkpoints is no larger than one of one model, and each checkpoint's row is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribdb.errors import ConfigError
from attribdb.rows import INDEX_DIM_MULTIPLE, SCALE_BYTES, SELF_INFLUENCE_DTYPE, SKETCH_DIM

# Measured on the demo model's database of 26,279 windows of 128 tokens of English: LMDB 1,692 bytes
# per row on disk (its record, the document index, the journal and B-tree pages), text.sqlite 192:
# 14.7 bytes per token
METADATA_BYTES_PER_TOKEN = 16
NORM_BYTES = np.dtype(SELF_INFLUENCE_DTYPE).itemsize  # the self-influence beside each payload
SMALLEST_PAYLOAD = 64  # a header and a component or two of a small model: less is no row


@dataclass(frozen=True)
class RowCost:
    """Bytes one row costs, by where they lie."""

    row_store: int  # the payload and its self-influence
    codes: int  # the database index's codes and id
    metadata: int  # the estimate of its LMDB record and full-text entry

    @property
    def total(self) -> int:
        return self.row_store + self.codes + self.metadata

    def to_dict(self) -> dict:
        return {"row_store": self.row_store, "codes": self.codes, "metadata": self.metadata, "total": self.total}


def metadata_bytes(max_length: int) -> int:
    return METADATA_BYTES_PER_TOKEN * max_length


def index_code_bytes() -> int:
    """Bytes the database index holds per row: codes of a sketch of :data:`SKETCH_DIM` coordinates."""
    from attribdb.db_index import code_bytes

    return code_bytes(-(-SKETCH_DIM // INDEX_DIM_MULTIPLE) * INDEX_DIM_MULTIPLE)


def row_cost(row_layouts, max_length: int) -> RowCost:
    """What a sequence costs with a row of each of these layouts (one per checkpoint), as built."""
    from attribdb.db_index import code_bytes

    return RowCost(sum(r.bytes_per_row for r in row_layouts), sum(code_bytes(r.index_dim) for r in row_layouts),
                   metadata_bytes(max_length))


def check_room(row_bytes: int, max_length: int) -> None:
    """Refuse a budget that the metadata alone would fill (the codes are checked by
    :func:`payload_budget`, which needs FAISS to price them)."""
    if row_bytes - NORM_BYTES - metadata_bytes(max_length) < SMALLEST_PAYLOAD:
        raise _no_room(row_bytes, max_length)


def _no_room(row_bytes: int, max_length: int) -> ConfigError:
    return ConfigError(f"row-bytes {row_bytes} leaves no room for a row: its metadata at max-length {max_length} "
                       f"({metadata_bytes(max_length)} bytes) and index codes need more; raise --row-bytes")


def payload_budget(row_bytes: int, max_length: int, checkpoints: int = 1) -> int:
    """The payload bytes of each checkpoint's row when a sequence costs ``row_bytes`` all-in (what
    attribdb.rows lays a row out under)."""
    payload = (row_bytes - metadata_bytes(max_length)) // checkpoints - NORM_BYTES - index_code_bytes()
    if payload < max(SMALLEST_PAYLOAD, SCALE_BYTES):
        if checkpoints > 1:
            raise ConfigError(f"row-bytes {row_bytes} leaves no room for rows of {checkpoints} checkpoints (each "
                              f"needs its own row and index codes, {index_code_bytes() + NORM_BYTES + SMALLEST_PAYLOAD}"
                              " bytes at least); raise --row-bytes")
        raise _no_room(row_bytes, max_length)
    return payload


def planned_cost(row_bytes: int, max_length: int, checkpoints: int = 1) -> RowCost:
    """What a sequence of a database built with these settings will cost, before it is fitted."""
    return RowCost(checkpoints * (payload_budget(row_bytes, max_length, checkpoints) + NORM_BYTES),
                   checkpoints * index_code_bytes(), metadata_bytes(max_length))
