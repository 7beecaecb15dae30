"""Manifest integrity: a checksum over the body, and a schema naming the key at fault."""

from __future__ import annotations

import json

import pytest

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.manifest import Manifest
from attribdb.shard import ShardReader
from tools.checks.torture import manifest_setter  # the fault-injection tool edits manifests the same way)

from dbtools import cli_here, copy_db, copy_manifest, one_line_error, rewrite_manifest


def test_a_hand_edit_fails_the_checksum(tmp_path, built_db):
    db = copy_manifest(built_db, tmp_path / "db")
    path = db / layout.MANIFEST
    text = path.read_text()
    assert '"row_bytes": 4096' in text
    path.write_text(text.replace('"row_bytes": 4096', '"row_bytes": 4095'))
    with pytest.raises(StoreError, match="fails its checksum: it was edited or damaged"):
        Manifest.load(db)
    one_line_error(cli_here("verify", db), "manifest.json fails its checksum")


def _delete(*keys):
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


@pytest.mark.parametrize("edit, message", [
    (manifest_setter("settings", "rwo_bytes", value=4096), "settings.rwo_bytes is not a manifest key"),
    (_delete("settings", "row_bytes"), "settings.row_bytes is missing"),
    (manifest_setter("settings", "row_bytes", value=0), "row-bytes must be positive"),
    (manifest_setter("settings", "row_bytes", value="4096"), "settings.row_bytes must be an integer"),
    (manifest_setter("settings", "row_kind", value="kron"), "settings.row_kind is not a manifest key"),  # format 4's
    (manifest_setter("settings", "damping_factor", value=None), "settings.damping_factor must be a finite number"),
    (manifest_setter("generations", 0, "shards", value=10 ** 9), "generations[0].shards is 1000000000, but"),
    (manifest_setter("generations", 0, "sequences", value=-5), "generations[0].sequences must be at least 1"),
    (manifest_setter("generations", 0, "state", value="done"),
     "generations[0].state must be one of building, complete"),
    (manifest_setter("generations", 0, "first_shard", value=3), "generations[0].first_shard is 3"),
    (_delete("rows"), "rows is missing"),
    (manifest_setter("rows", value=None), "rows is null although the factors were fitted"),
    (manifest_setter("rows", "format", value="kron"), "rows.format must be one of"),
    (manifest_setter("rows", "subspaces", value={}), "rows.subspaces."),
    (manifest_setter("rows", "payload_bytes", value=0), "rows.payload_bytes must be at least 1"),
    (manifest_setter("rows", "sketch_dim", value=7), "rows.sketch_dim is not a manifest key"),
    (manifest_setter("sketch_dim", value=7), "sketch_dim is not a manifest key"),  # format 1's key
    (manifest_setter("block_coverage", value="most"), "block_coverage must be a share"),
    (manifest_setter("block_coverage", value=1.5), "block_coverage must be a share"),
    (manifest_setter("modules", 0, "d_in", value=True), "modules[0].d_in must be an integer"),
    (manifest_setter("extra", value=1), "extra is not a manifest key"),
])
def test_schema_violations_are_refused_naming_the_key(tmp_path, built_db, edit, message):
    db = copy_manifest(built_db, tmp_path / "db")
    rewrite_manifest(db, edit)
    with pytest.raises(StoreError) as caught:
        Manifest.load(db)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_saved_manifest_round_trips(tmp_path, built_db):
    db = copy_manifest(built_db, tmp_path / "db")
    manifest = Manifest.load(db)
    manifest.save(db)
    assert Manifest.load(db).to_dict() == manifest.to_dict()
    assert "checksum" in json.loads((db / layout.MANIFEST).read_text())


def test_a_query_on_an_absurd_shard_count_fails_at_once(tmp_path, built_db):
    db = copy_db(built_db, tmp_path / "db")
    rewrite_manifest(db, manifest_setter("generations", 0, "shards", value=10 ** 9))
    one_line_error(cli_here("query", db, "--prompt", "the", "--completion", " cat"),
                   "generations[0].shards")


def test_a_resealed_manifest_that_disagrees_with_its_files_is_one_line(tmp_path, built_db):
    """A program that rewrites the manifest consistently (valid checksum) still cannot change the row
    layout: the row projections refuse it, and so does every shard's rows array."""
    db = copy_db(built_db, tmp_path / "db")
    manifest = Manifest.load(db)
    first = manifest.modules[0].name
    k_out, k_in = manifest.rows["subspaces"][first]
    rewrite_manifest(db, manifest_setter("rows", "subspaces", first, value=[k_out, k_in + 1]))
    one_line_error(cli_here("verify", db), "does not match the manifest's row layout")
    one_line_error(cli_here("query", db, "--prompt", "the", "--completion", " cat"),
                   "does not match the manifest's row layout")
    payload = manifest.rows["payload_bytes"]
    rewrite_manifest(db, manifest_setter("rows", "payload_bytes", value=payload + 1))
    with pytest.raises(StoreError, match=rf"rows holds rows of shape \(32, {payload}\).*manifest and shard disagree"):
        ShardReader(layout.shard_dir(db, 0), Manifest.load(db).row_layout())

