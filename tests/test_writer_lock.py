"""One writer per database: the lock file, and rows written only at their own positions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.records import RowRecord
from attribdb.rows import RowLayout
from attribdb.shard import RowBlock, ShardWriter
from attribdb.tracking import TrackedModule
from attribdb.writelock import writer_lock

from dbtools import SMALL_SETTINGS, cli_here

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from attribdb.writelock import writer_lock
    with writer_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def other_writer(tmp_path):
    """A separate process holding the writer lock of tmp_path/db."""
    db = tmp_path / "db"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdout=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert process.stdout.readline().strip() == "held"
    yield db, process.pid
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(other_writer, corpus, model_dir):
    db, pid = other_writer
    with pytest.raises(StoreError, match=f"being written by process {pid}"):
        with writer_lock(db):
            pass
    result = cli_here("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {db} is being written by process {pid} (fit, build or append); " \
                                    "wait for it to finish"
    assert not (db / "manifest.json").exists(), "a refused writer must not touch the database"


def test_the_lock_is_reentrant_and_released(tmp_path):
    db = tmp_path / "db"
    with writer_lock(db):
        with writer_lock(db):  # build fits its factors under the lock it holds
            assert (db / "lock").read_text().strip() == str(os.getpid())
    probe = subprocess.run([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(60)", "pass"), str(db)],
                           capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert probe.stdout.strip() == "held", probe.stderr


def _block(start: int, n: int, row_layout: RowLayout) -> RowBlock:
    rng = np.random.default_rng(start)
    return RowBlock(rows=rng.integers(0, 256, (n, row_layout.payload_bytes), dtype=np.uint8),
                    self_influence=rng.random(n, dtype=np.float32),
                    metadata=[RowRecord(f"d{start + i}", "test", (0, 2), (0, 1), "x", (1, 2), start + i)
                              for i in range(n)])


def test_a_block_is_written_only_at_its_own_start(tmp_path):
    row_layout = RowLayout((TrackedModule("m", 3, 2, True),), subspaces=((2, 3),), payload_bytes=40, sketch_widths=(4,))
    writer = ShardWriter(tmp_path / "shard", row_layout, capacity=8, commit_rows=4)
    try:
        writer.append(_block(0, 4, row_layout), start=0)
        for wrong in (0, 8):  # a second writer's stale view, or a gap
            with pytest.raises(StoreError, match=f"rows from {wrong}.*committed 4"):
                writer.append(_block(wrong, 4, row_layout), start=wrong)
        assert writer.committed == 4
        writer.append(_block(4, 4, row_layout), start=4)
        assert writer.committed == 8
        np.testing.assert_array_equal(writer.stores[0][0][layout.ROWS][4:8], _block(4, 4, row_layout).rows)
    finally:
        writer.close()
