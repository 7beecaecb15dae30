"""Options and inputs refused at the edge with one line, and a failed first build that leaves nothing."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from attribdb import api, layout
from attribdb.errors import ConfigError, QueryError, StoreError
from attribdb.manifest import Manifest
from attribdb.settings import DatabaseSettings
from attribdb.writelock import writer_lock

from dbtools import SMALL_SETTINGS, cli, cli_here, copy_db, one_line_error

FIT_SETTINGS = [*SMALL_SETTINGS, "--fit-sample-size", "16"]


@pytest.mark.parametrize("option, value", [("--damping", "inf"), ("--damping", "nan"), ("--damping", "-1"),
                                           ("--damping-factor", "nan"), ("--damping-factor", "inf")])
def test_damping_must_be_finite_and_not_negative(tmp_path, corpus, model_dir, option, value):
    db = tmp_path / "db"
    result = cli_here("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS, option, value)
    one_line_error(result, option.lstrip("-"), "finite")
    assert not db.exists()
    with pytest.raises(ConfigError):
        DatabaseSettings(model_path="m", **{option.lstrip("-").replace("-", "_"): float(value)})


def test_an_unknown_fit_precision_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown fit precision 'float16'; choose one of float32, bfloat16"):
        api.fit(tmp_path / "db", tmp_path / "no-corpus.jsonl", tmp_path / "no-model", fit_precision="float16")
    assert not (tmp_path / "db").exists()


def test_max_length_beyond_the_context_fails_first_and_leaves_nothing(tmp_path, corpus, model_dir):
    db = tmp_path / "db"
    args = ["fit", db, "--corpus", corpus, "--model", model_dir, "--quiet", *FIT_SETTINGS]
    result = cli_here(*args, "--max-length", "65")  # the test model has 64 positions
    one_line_error(result, "max-length 65 exceeds the model's context of 64 positions")
    assert not db.exists(), "a failed first fit must leave nothing behind"
    db.mkdir()  # a folder the user made is kept, emptied of what the failed run wrote
    one_line_error(cli_here(*args, "--max-length", "65"), "context of 64")
    assert list(db.iterdir()) == [db / layout.LOCK_FILE]
    cli_here(*args, "--max-length", "64")  # the corrected retry
    assert Manifest.load(db).settings.max_length == 64


@pytest.mark.slow
def test_a_first_fit_killed_between_its_files_is_started_again(tmp_path, corpus, model_dir):
    db = tmp_path / "db"
    args = ["fit", db, "--corpus", corpus, "--model", model_dir, "--quiet", *FIT_SETTINGS]
    killed = cli(*args, env_extra={"ATTRIBDB_KILL_AT": "factors-saved:1"}, check=False)
    assert killed.returncode == -9 and layout.factors_path(db).is_file() and not layout.projection_path(db).exists()
    assert Manifest.load(db).rows is None
    one_line_error(cli_here("build", db, "--corpus", corpus), "interrupted", "give --model")  # was a traceback
    cli_here(*args, "--row-bytes", "2048")  # other options: nothing of the stub is kept
    manifest = Manifest.load(db)
    assert manifest.settings.row_bytes == 2048 and manifest.rows is not None
    assert set(manifest.factor_digests) == {p.name for p in layout.factor_files(db)} == \
        {layout.FACTORS_FILE, layout.PROJECTION_FILE}


def test_a_model_folder_without_tokenizer_is_refused(tmp_path, corpus, model_dir):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for item in model_dir.iterdir():
        if "token" not in item.name and item.name not in ("vocab.json", "merges.txt"):
            shutil.copy(item, bare / item.name)
    result = cli_here("build", tmp_path / "db", "--corpus", corpus, "--model", bare, "--quiet", *SMALL_SETTINGS)
    one_line_error(result, "has no tokenizer")
    assert not (tmp_path / "db").exists()


def test_counts_in_the_python_api_are_checked_before_any_work(built_db):
    database = api.open(built_db)
    for call in (lambda: database.exhaustive([("the", " cat")], k=-1), lambda: database.query("the", " cat", k=0),
                 lambda: database.query("the", " cat", candidates=0), lambda: database.exact("a", " b", k=True),
                 lambda: database.self_influence(top=-3)):
        with pytest.raises(QueryError, match="must be an integer of at least"):
            call()
    assert "engine" not in database.__dict__, "nothing was loaded for a refused call"


def test_a_non_utf8_query_file_is_one_line(tmp_path, built_db):
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b'{"prompt": "the \xff cat", "completion": " sat"}\n')
    one_line_error(cli_here("query", built_db, "--queries", queries), "not UTF-8")


def test_a_database_that_cannot_be_written_is_refused_in_one_line(tmp_path, built_db, monkeypatch):
    db = copy_db(built_db, tmp_path / "db")
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(layout.LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(StoreError, match="cannot write to .*Permission denied.*read-only database"):
        with writer_lock(db):
            pass
