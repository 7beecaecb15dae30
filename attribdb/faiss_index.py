"""FAISS files: written whole or not at all, read back memory-mapped where FAISS allows; and the
norm division every cosine here shares.

FAISS holds codes only (attribdb/db_index.py): the rows themselves live once, in the row store.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attribdb.native import faiss


def divide_by_norm(values, squared_norms):
    """values / √squared_norms, and 0 where that norm is 0: how a score or a sketch becomes a
    cosine's part, self-influence being a squared norm."""
    norms = np.sqrt(np.maximum(np.asarray(squared_norms, dtype=np.float64), 0.0))
    return np.divide(values, norms, out=np.zeros(np.broadcast(values, norms).shape), where=norms > 0)


def write_index(index, path: Path) -> None:
    """``index`` at ``path``, through a temporary file renamed into place."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: Path, mmap: bool = True):
    """Codes that FAISS can map stay on disk (``IO_FLAG_MMAP_IFC``: the re-ranking codes), so the
    query process holds only what a scan reads; ``mmap=False`` reads it whole, for adding to it."""
    if not mmap:
        return faiss.read_index(str(path))
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
