"""The frame of every write to a database: its writer lock, and no half-made database left behind.

A first build that fails before it has registered any rows (a bad option found
once the model is loaded, a corpus with no text, Ctrl-C during the fit) used
to leave a stub manifest that refused the corrected retry.  Nothing in such a
stub can be resumed (fitting starts over anyway), so it is removed; once a
generation is registered, its committed rows are kept for the resume.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.manifest import Manifest, exists
from attribdb.writelock import writer_lock


def _has_rows(root: Path) -> bool:
    try:
        return bool(Manifest.load(root).generations)
    except StoreError:
        return False


@contextmanager
def writing(root: Path):
    """Hold the writer lock; if this run created the database and fails before registering rows,
    remove what it made (the whole folder when the run created it)."""
    root = Path(root)
    new_folder, new_database = not root.exists(), not exists(root)
    with writer_lock(root):
        try:
            yield
        except BaseException:
            if new_database and not _has_rows(root):
                if new_folder:
                    shutil.rmtree(root, ignore_errors=True)
                else:
                    (root / layout.MANIFEST).unlink(missing_ok=True)
                    for name in (layout.FACTORS_DIR, layout.SHARDS_DIR):
                        shutil.rmtree(root / name, ignore_errors=True)
            raise
