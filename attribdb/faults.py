"""Kill points for fault-injection testing: the crash tests kill a build at each of them.

``ATTRIBDB_KILL_AT=<point>:<n>`` makes the process SIGKILL itself the n-th
time (from 1) it passes ``point``: the way to test that a build killed at any
step resumes to the same database without relying on timing.  Unset, a point
costs one dictionary lookup.  The points: factors-saved (between the two
factor files), generation-registered (manifest saved, no shard yet),
unit-written (the unit's row file and Zarr chunk written, LMDB commit not yet),
unit-committed, indexes-written (a shard's text index written, the shard not
yet marked sealed), shard-sealed.
"""

from __future__ import annotations

import os
import signal

ENV = "ATTRIBDB_KILL_AT"
_passed: dict[str, int] = {}


def point(name: str) -> None:
    """Die here if the environment asks for it."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, count = wanted.partition(":")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
