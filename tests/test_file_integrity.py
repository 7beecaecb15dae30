"""Factor files and Zarr metadata and chunks: damage is one line naming the file, never an answer (the
database index: tests/test_db_index.py)."""

from __future__ import annotations

import pytest

from attribdb import layout

from dbtools import cli_here, copy_db, one_line_error

QUERY = ["--prompt", "the cat", "--completion", " sat over the house"]


def _flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(at * (len(data) - 1))] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, mode", [(layout.FACTORS_FILE, "exact"), (layout.PROJECTION_FILE, "index")])
def test_a_damaged_factor_file_fails_verify_and_queries(tmp_path, built_db, name, mode):
    """Index queries read only the row projections; the full factors are checked when first loaded
    (exact and exhaustive modes)."""
    db = copy_db(built_db, tmp_path / "db")
    _flip(db / layout.FACTORS_DIR / name, at=1.0)  # the last byte: a float the loader would take as it is
    one_line_error(cli_here("verify", db), name, "sha256 differs")
    one_line_error(cli_here("query", db, *QUERY, "--mode", mode), name, "is damaged")


@pytest.mark.parametrize("array", [layout.SELF_INFLUENCE, layout.ROWS])
def test_damaged_zarr_metadata_is_one_line(tmp_path, built_db, array):
    db = copy_db(built_db, tmp_path / "db")
    (layout.shard_dir(db, 1) / layout.GRADS_ZARR / array / "zarr.json").write_text("{not json")
    one_line_error(cli_here("verify", db), "00001", array)
    one_line_error(cli_here("query", db, *QUERY), "00001", array)


@pytest.mark.parametrize("array", [layout.SELF_INFLUENCE, layout.ROWS])
def test_a_missing_multi_row_chunk_is_not_read_as_zeros(tmp_path, built_db, array):
    """A small database is searched by scanning its rows, so a query reads every chunk too."""
    db = copy_db(built_db, tmp_path / "db")
    chunk = layout.shard_dir(db, 1) / layout.GRADS_ZARR / array / "c" / "1"  # rows 8-15
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    one_line_error(cli_here("verify", db), str(chunk.relative_to(db)), "is missing")
    one_line_error(cli_here("query", db, *QUERY), str(chunk.relative_to(db)), "is missing")
