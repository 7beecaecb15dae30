"""verify on an unfinished build (no false alarm) and on a shard deleted from a finished one."""

from __future__ import annotations

import shutil

import pytest

from attribdb import layout

from dbtools import SMALL_SETTINGS, assert_same_database, cli, cli_here, copy_db, one_line_error

PENDING_EXIT = 3


@pytest.mark.slow
def test_an_interrupted_build_is_reported_as_resumable_then_resumes(tmp_path, corpus, model_dir, built_db):
    db = tmp_path / "db"
    build = ["build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS]
    total = int(cli_here("info", built_db, "--json").stdout.split('"sequences": ')[1].split(",")[0])
    resume = f"resume with `attribdb build {db} --corpus {corpus}`"
    for kill_at, committed in (("unit-written:1", 0), ("unit-committed:20", 160)):
        killed = cli(*build, env_extra={"ATTRIBDB_KILL_AT": kill_at}, check=False)
        assert killed.returncode == -9, killed.stderr[-2000:]
        report = cli_here("verify", db)
        assert report.returncode == PENDING_EXIT, report.stderr
        assert f"build in progress or interrupted: {committed} of {total} rows committed; {resume}" in report.stdout
    cli_here(*build)
    assert cli_here("verify", db).stdout.startswith(f"ok: {total} rows")
    assert_same_database(db, built_db)


def test_a_deleted_shard_fails_verify_and_queries(tmp_path, built_db):
    db = copy_db(built_db, tmp_path / "db")
    shutil.rmtree(layout.shard_dir(db, 3))
    one_line_error(cli_here("verify", db), "shard 00003")
    one_line_error(cli_here("query", db, "--prompt", "the cat", "--completion", " sat"),
                   "shard 00003", "is missing")
