"""LMDB environments of shard metadata, mapped no larger than what they hold.

LMDB maps an environment's whole ``map_size`` into the address space when it
opens.  A fixed 256 GiB per shard ran out of the 128 TiB of user address space
at the 511th shard, capping a query process at ~2M rows.  Writers now start at
a size scaled to the shard's capacity and double it when a transaction finds
the map full (the whole transaction is retried, so nothing half-written
survives); readers map the data file's size, and adopt a writer's larger size
when LMDB reports that another process grew the map.

LMDB allows one environment per file per process, so environments are shared
by path and closed when their last user closes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

from attribdb.errors import StoreError

GRANULE = 1 << 16  # map sizes are multiples of this
MIN_MAP_SIZE = 1 << 20
ROW_BYTES = 4096  # a row's JSON metadata (text and token ids of a 128-token window) is 1-2 KiB, plus its doc entry
MAX_DBS = 4

T = TypeVar("T")

_ENVIRONMENTS: dict[str, list] = {}  # realpath -> [environment, users]


LMDB_MAGIC = 0xBEEFC0DE
# offsets in an LMDB meta page (lmdb 0.9, 64-bit): page header 16 bytes, then magic and version,
# address, map size, two 48-byte db records (the first one's pad holds the page size), last page, txn id
_META_MAGIC, _META_PAGE_SIZE, _META_LAST_PAGE = 16, 40, 136


@contextmanager
def lmdb_errors(where: str):
    """LMDB's own exceptions (a damaged file, a map it cannot read) as a one-line StoreError."""
    try:
        yield
    except lmdb.Error as exc:
        raise StoreError(f"{where}: LMDB cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") \
            from None


def check_data_file(path: Path) -> None:
    """Refuse a data.mdb shorter than its newest meta page says it is, before mapping it.

    LMDB maps the file and reads pages past a truncated end, which kills the process with a
    bus error instead of raising; the meta pages at the start of the file say how many pages
    the last commit used."""
    data = Path(path) / "data.mdb"
    if not data.is_file():
        return
    size = data.stat().st_size
    with open(data, "rb") as handle:
        head = handle.read(_META_LAST_PAGE + 16)
        if len(head) < _META_LAST_PAGE + 16:
            raise StoreError(f"{data} is truncated ({size} bytes): the shard's metadata is damaged")
        page_size = int.from_bytes(head[_META_PAGE_SIZE:_META_PAGE_SIZE + 4], "little")
        if page_size < 512 or page_size & (page_size - 1):
            raise StoreError(f"{data} is not an LMDB file (page size {page_size}): the shard's metadata is damaged")
        metas = [head]
        handle.seek(page_size)
        metas.append(handle.read(_META_LAST_PAGE + 16))
    needed = 0
    for meta in metas:
        magic = int.from_bytes(meta[_META_MAGIC:_META_MAGIC + 4], "little")
        if len(meta) < _META_LAST_PAGE + 16 or magic != LMDB_MAGIC:
            raise StoreError(f"{data} has a damaged header: the shard's metadata is damaged")
        needed = max(needed, (int.from_bytes(meta[_META_LAST_PAGE:_META_LAST_PAGE + 8], "little") + 1) * page_size)
    if size < needed:
        raise StoreError(f"{data} is truncated ({size} of {needed} bytes): the shard's metadata is damaged")


def _round_up(size: int) -> int:
    return -(-size // GRANULE) * GRANULE


def writer_map_size(capacity_rows: int) -> int:
    """Where a writer's map starts: enough for ``capacity_rows`` typical rows, grown on demand."""
    return _round_up(max(MIN_MAP_SIZE, capacity_rows * ROW_BYTES))


def open_env(path: Path, *, readonly: bool, capacity_rows: int = 0) -> lmdb.Environment:
    """The process's environment for ``path`` (opened on first use).

    A reader maps the data file's size; LMDB raises a smaller ``map_size`` to
    what the file already holds, so a resumed writer keeps its rows.
    """
    key = str(Path(path).resolve())
    if key in _ENVIRONMENTS:
        env, users = _ENVIRONMENTS[key]
        if not readonly and env.flags()["readonly"]:
            raise StoreError(f"{path} is open read-only in this process; close its readers before writing")
        _ENVIRONMENTS[key][1] = users + 1
        return env
    check_data_file(Path(key))  # a truncated file would be a bus error once mapped, not an exception
    if readonly:
        data = Path(key) / "data.mdb"
        map_size = _round_up(data.stat().st_size) if data.is_file() else GRANULE
    else:
        map_size = writer_map_size(capacity_rows)
    options = dict(map_size=map_size, max_dbs=MAX_DBS, readonly=readonly, subdir=True, create=not readonly)
    with lmdb_errors(str(path)):
        try:
            env = lmdb.open(key, **options)
        except lmdb.Error:
            if not readonly or os.access(key, os.W_OK):
                raise
            env = lmdb.open(key, lock=False, **options)  # a read-only copy: no one can be writing it
    _ENVIRONMENTS[key] = [env, 1]
    return env


def close_env(env: lmdb.Environment) -> None:
    key = next(k for k, (e, _) in _ENVIRONMENTS.items() if e is env)
    _ENVIRONMENTS[key][1] -= 1
    if _ENVIRONMENTS[key][1] == 0:
        del _ENVIRONMENTS[key]
        env.close()


def write(env: lmdb.Environment, body: Callable[[lmdb.Transaction], T]) -> T:
    """Run ``body`` in one write transaction, doubling the map and rerunning it while the map is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                return body(txn)
        except lmdb.MapFullError:
            env.set_mapsize(2 * env.info()["map_size"])


@contextmanager
def read(env: lmdb.Environment, db=None) -> Iterator[lmdb.Transaction]:
    """A read transaction; when another process grew the map, adopt its size and begin again."""
    try:
        txn = env.begin(db=db)
    except lmdb.MapResizedError:
        env.set_mapsize(0)  # 0: the size the writer recorded in the file
        txn = env.begin(db=db)
    with txn:
        yield txn
