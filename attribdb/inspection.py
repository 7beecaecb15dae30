"""`attribdb info` and `attribdb verify`: what a database holds, and whether it is whole.

``verify`` reads everything: every row file and Zarr chunk (each row and chunk
CRC32C-checked), every LMDB row, the journal, the database index and the
full-text index, and checks that manifest, Zarr, LMDB, FAISS and the text index
agree; it stops at the first problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribdb import layout
from attribdb.errors import StoreError
from attribdb.factors import Factors
from attribdb.manifest import Generation, Manifest
from attribdb.row_costs import row_cost
from attribdb.rows import RowProjection, check_payloads, relative_difference
from attribdb.shard import ShardReader


def _files(path: Path) -> list[int]:
    """The sizes of the files at or under ``path``; a file a running writer renames or deletes
    meanwhile (a temporary file, a retired index) is skipped, not an error."""
    sizes = []
    for file in [path] if path.is_file() else path.rglob("*"):
        try:
            if file.is_file():
                sizes.append(file.stat().st_size)
        except FileNotFoundError:
            continue
    return sizes


def _size(path: Path) -> int:
    return sum(_files(path))


def existing_shards(root: Path, manifest: Manifest) -> list[tuple[int, Path]]:
    """The shards a reader opens: every shard of a complete generation, where a missing one is an
    error (answering without it would silently drop its rows), and those an unfinished build has
    started."""
    out = []
    for generation in manifest.generations:
        for shard_id in generation.shard_ids:
            path = layout.shard_dir(root, shard_id)
            if (path / layout.META_LMDB).is_dir():
                out.append((shard_id, path))
            elif generation.state == "complete":
                raise StoreError(f"shard {shard_id:05d} ({path}) is missing: the database is damaged "
                                 "(restore the shard, or rebuild)")
    return out


def database_info(root: str | Path) -> dict:
    """Counts, sizes on disk, settings and the row layout, as a JSON-able dict."""
    root = Path(root)
    manifest = Manifest.load(root)
    checkpoints = range(manifest.checkpoint_count)
    stores = {"zarr": [layout.grads_zarr(c) for c in checkpoints], "lmdb": [layout.META_LMDB],
              "text": [layout.TEXT_FILE]}
    sizes = {"factors": _size(root / layout.FACTORS_DIR)} | dict.fromkeys(stores, 0)
    rows = 0
    for _, path in existing_shards(root, manifest):
        for store, names in stores.items():
            sizes[store] += sum(_size(path / name) for name in names)
        reader = ShardReader(path, manifest.row_layout())
        try:
            rows += reader.rows
        finally:
            reader.close()
    recorded = manifest.database_index
    sizes["faiss"] = sum(_size(root / layout.INDEX_DIR / index["file"])
                         for index in (manifest.holder(c).database_index for c in checkpoints) if index)
    fitted = all(manifest.holder(c).rows is not None for c in checkpoints)
    row_layouts = [manifest.row_layout(c) for c in checkpoints] if fitted else []
    return {
        "path": str(root),
        "model": {"path": manifest.settings.model_path, "fingerprint": manifest.model_fingerprint},
        "sequences": rows,
        "documents": sum(g.documents or 0 for g in manifest.generations),
        "shards": len(manifest.shard_ids),
        "tracked_modules": len(manifest.modules),
        "block_coverage": manifest.block_coverage,
        "generations": [{"corpus": g.corpus["path"], "state": g.state, "sequences": g.sequences,
                         "malformed": g.malformed} for g in manifest.generations],
        "bytes": sizes | {"total": _size(root)},
        "files": len(_files(root)),
        "bytes_per_sequence": {key: sizes[key] / rows for key in ("zarr", "faiss", "lmdb", "text")} if rows else None,
        "database_index": recorded,
        "row": _row_info(row_layouts[0], row_layouts, manifest.settings.max_length) if row_layouts else None,
        "checkpoints": [_checkpoint_info(manifest, c, row_layouts) for c in checkpoints] if manifest.checkpoints
        else None,
        "settings": manifest.settings.to_dict(),
    }


def _checkpoint_info(manifest: Manifest, checkpoint: int, row_layouts: list) -> dict:
    """A trajectory database's checkpoint: its name, step, weight, model and row."""
    entry, holder = manifest.checkpoints[checkpoint], manifest.holder(checkpoint)
    return {"name": entry.name, "step": entry.step, "weight": entry.weight,
            "model": {"path": holder.model_path, "fingerprint": holder.model_fingerprint},
            "database_index": holder.database_index,
            "row": _row_info(row_layouts[checkpoint], row_layouts[checkpoint:checkpoint + 1],
                             manifest.settings.max_length) if row_layouts else None}


def _row_info(row_layout, all_layouts: list, max_length: int) -> dict:
    """What a row is: its size against the dense gradient, the share of influence it keeps, and
    what a sequence costs all-in with a row of each of ``all_layouts`` (attribdb/row_costs.py:
    the figure `attribdb plan` prints)."""
    return {
        "bytes": row_layout.bytes_per_row,
        "payload_bytes": row_layout.payload_bytes,
        "all_in": row_cost(all_layouts, max_length).to_dict(),
        "dense_float32_bytes": row_layout.dense_bytes_per_row,
        "subspaces": {m.name: list(s) for m, s in zip(row_layout.modules, row_layout.subspaces)},
        "whole_space": row_layout.whole_space,
        "kept": row_layout.kept,
        "sketch_dim": row_layout.sketch_dim,
    }


@dataclass
class VerifyReport:
    shards: int
    rows: int
    pending: str | None = None  # an unfinished fit or build: what is committed and how to resume
    recomputed: int = 0  # rows recomputed from their tokens and found equal (verify --deep)


def _resume_command(root: Path, generation: Generation) -> str:
    corpus = generation.corpus
    command = "append" if generation.first_shard else "build"
    defaults = {"format": "auto", "text_field": "text", "id_field": "id", "on_error": "fail"}
    options = "".join(f" --{key.replace('_', '-')} {corpus[key]}" for key, default in defaults.items()
                      if corpus.get(key, default) != default)
    return f"attribdb {command} {root} --corpus {corpus['path']}{options}"


def verify_database(root: str | Path) -> VerifyReport:
    """Raise :class:`StoreError` naming the first problem; return counts when all agree."""
    root = Path(root)
    manifest = Manifest.load(root)
    if not manifest.generations and not manifest.factor_digests:
        return VerifyReport(0, 0, "fit in progress or interrupted: no factors yet; resume with the same "
                                  f"`attribdb build {root} ...` or `attribdb fit {root} ...` command")
    for c in range(manifest.checkpoint_count):
        manifest.check_factor_files(root, checkpoint=c)
        factors = Factors.load(layout.factors_path(root, c))
        if [m.name for m in factors.modules] != [m.name for m in manifest.modules]:
            raise StoreError("factors and manifest track different modules")
        RowProjection.load(layout.projection_path(root, c), manifest.row_layout(c))
        _verify_database_index(root, manifest, c)
    total_rows, pending = 0, None
    for generation in manifest.generations:
        rows = sum(_verify_shard(root, manifest, s, generation) for s in generation.shard_ids)
        if generation.state == "complete" and rows != generation.sequences:
            raise StoreError(f"generation {generation.corpus['path']}: manifest says {generation.sequences} "
                             f"sequences, shards hold {rows}")
        total_rows += rows
        if generation.state == "building":
            pending = (f"build in progress or interrupted: {rows} of {generation.sequences} rows committed; "
                       f"resume with `{_resume_command(root, generation)}`")
    return VerifyReport(len(manifest.shard_ids), total_rows, pending)


def _verify_database_index(root: Path, manifest: Manifest, checkpoint: int) -> None:
    """A checkpoint's database-wide FAISS index, when there is one: present, its CRC32C as
    recorded, as many vectors as the shards it covers hold rows (attribdb/db_index.py checks these
    on open), and every row's codes those its row encodes to."""
    recorded = manifest.holder(checkpoint).database_index
    if recorded is None:
        return
    from attribdb.db_index import IndexSet, check_codes

    covered = recorded["shards"]
    row_layout = manifest.row_layout(checkpoint)
    readers = {s: ShardReader(layout.shard_dir(root, s), row_layout, checkpoint) for s in covered
               if (layout.shard_dir(root, s) / layout.META_LMDB).is_dir()}
    try:
        if len(readers) != len(covered):
            missing = min(set(covered) - set(readers))
            raise StoreError(f"the database index covers shard {missing:05d}, which is missing")
        unsealed = [s for s, reader in readers.items() if not reader.sealed]
        if unsealed:
            raise StoreError(f"the database index covers shard {unsealed[0]:05d}, which is not sealed")
        projection = RowProjection.load(layout.projection_path(root, checkpoint), row_layout)
        check_codes(IndexSet.open(root, manifest, readers, projection, checkpoint).database, readers, covered,
                    projection)
    finally:
        for reader in readers.values():
            reader.close()


def _verify_shard(root: Path, manifest: Manifest, shard_id: int, generation: Generation) -> int:
    complete = generation.state == "complete"
    path = layout.shard_dir(root, shard_id)
    if not (path / layout.META_LMDB).is_dir():
        if complete:
            raise StoreError(f"shard {shard_id:05d} is missing")
        return 0
    reader = ShardReader(path, manifest.row_layout())
    try:
        name = f"shard {shard_id:05d}"
        if complete and not reader.sealed:
            raise StoreError(f"{name} is not sealed although its build completed")
        for c in range(manifest.checkpoint_count):
            view = reader.view(c, manifest.row_layout(c)) if c else reader
            _verify_row_store(view, name + (f" {view.grads}" if c else ""))
        _verify_metadata(reader, name, (shard_id - generation.first_shard) * manifest.settings.shard_size)
        if reader.has_text_index:
            _verify_text_index(reader, name)
        return reader.rows
    finally:
        reader.close()


def _verify_row_store(reader: ShardReader, name: str) -> None:
    """One checkpoint's rows of a shard: as many as LMDB committed, finite, every header within its
    payload, every self-influence at least 0."""
    arrays = {}
    for array_name in layout.ROW_ARRAYS:
        data = arrays[array_name] = _read_checked(reader, array_name, name)
        if len(data) != reader.rows:
            raise StoreError(f"{name}: {array_name} has {len(data)} rows, LMDB committed {reader.rows}")
        if not np.isfinite(data.astype(np.float64)).all():
            raise StoreError(f"{name}: {array_name} holds non-finite values")
    try:
        check_payloads(reader.layout, arrays[layout.ROWS])
    except StoreError as exc:
        raise StoreError(f"{name}: {exc}") from None
    if np.any(arrays[layout.SELF_INFLUENCE] < 0):
        raise StoreError(f"{name}: {layout.SELF_INFLUENCE} holds negative values: the row store is damaged")


def _read_checked(reader: ShardReader, array_name: str, name: str) -> np.ndarray:
    """Read an array one chunk at a time: a corrupted chunk is named by its rows, and no
    concurrent sibling read is left failing in zarr's event loop when we stop."""
    parts = []
    if not reader.rows:
        return reader.read(array_name)
    try:
        block = reader.row_files.unit if array_name == layout.ROWS else reader.group[array_name].chunks[0]
    except Exception as exc:  # zarr and json raise many types on damaged metadata
        raise StoreError(f"{name}: {array_name}/zarr.json cannot be read ({type(exc).__name__})") from None
    for start in range(0, reader.rows, block):
        rows = np.arange(start, min(start + block, reader.rows))
        try:
            parts.append(reader.read(array_name, rows))
        except StoreError as exc:  # our own direct reads say which file and why
            raise StoreError(f"{name}: array {array_name!r}, rows {rows[0]}-{rows[-1]}: {exc}") from None
        except Exception as exc:  # the checksum codec and zarr raise several types
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
            raise StoreError(f"{name}: array {array_name!r}, rows {rows[0]}-{rows[-1]} cannot be read "
                             f"(corrupted chunk: {reason})") from exc
    return np.concatenate(parts)


def _verify_metadata(reader: ShardReader, name: str, first_sequence: int) -> None:
    """Every record passes its checksum, and row i holds sequence ``first_sequence + i``."""
    for row in range(reader.rows):
        record = reader.metadata([row])[0]  # a record without a field fails to read
        if record.sequence != first_sequence + row:
            raise StoreError(f"{name}: row {row} holds sequence {record.sequence} of its corpus, "
                             f"not {first_sequence + row}: rows were written out of place")
        if row not in reader.document_rows(record.doc_id):
            raise StoreError(f"{name}: document {record.doc_id!r} does not list its row {row}")
    journal = [entry for entry in reader.journal() if entry["rows_end"] <= reader.rows]  # a writer may be ahead
    ends = [entry["rows_end"] for entry in journal]
    starts = [entry["rows_start"] for entry in journal]
    if (ends[-1:] or [0])[0] != reader.rows or starts != ([0] + ends[:-1])[:len(journal)]:
        raise StoreError(f"{name}: the commit journal does not cover rows 0..{reader.rows} contiguously: "
                         f"{json.dumps(journal[-3:])}")


def _verify_text_index(reader: ShardReader, name: str) -> None:
    """The stored full-text index passes its checksum and indexes exactly the rows' text in LMDB
    (the same terms, row counts and row lengths as an index built from it now)."""
    stored = reader.text_index()  # missing, failing its checksum, unreadable or miscounted: a StoreError
    fresh = reader.fresh_text_index()
    try:
        if not stored.same_entries(fresh):
            raise StoreError(f"{name}: its text index differs from the text of its rows in LMDB")
    finally:
        stored.close()
        fresh.close()


# A recomputed row may round a 4-bit code the other way, or keep a last component of another module
# of nearly the same size: a few percent of the row; another model's or another sequence's row differs
# by its whole norm
RECOMPUTED_TOLERANCE = 0.05


def verify_recomputed(root: str | Path, sample: int, device: str | None = None) -> int:
    """Recompute ``sample`` rows, spread evenly over the database, from their stored tokens and
    compare them with what is stored; return how many were compared.

    Checksums prove that bytes are as written, not that they are right: a row written by another
    model or projection, or copied over from another row with its checksum, passes them.  Only
    recomputing it from its tokens tells, at the cost of loading the model."""
    from attribdb.runtime import Runtime

    manifest = Manifest.load(root)
    shards = existing_shards(Path(root), manifest)
    readers = [(shard_id, ShardReader(path, manifest.row_layout())) for shard_id, path in shards]
    try:
        pairs = [(i, row) for i, (_, reader) in enumerate(readers) for row in range(reader.rows)]
        chosen = [pairs[int(j)] for j in np.unique(np.linspace(0, len(pairs) - 1, min(sample, len(pairs))).round())]
        for c in range(manifest.checkpoint_count):  # one model in memory at a time
            runtime = Runtime.load(root, device=device, checkpoint=c, manifest=manifest)
            for i in sorted({i for i, _ in chosen}):
                shard_id, reader = readers[i]
                _compare_recomputed(runtime, reader.view(c, runtime.row_layout) if c else reader, shard_id,
                                    np.array([row for j, row in chosen if j == i]))
            del runtime
        return len(chosen)
    finally:
        for _, reader in readers:
            reader.close()


def _compare_recomputed(runtime, reader: ShardReader, shard_id: int, rows: np.ndarray) -> None:
    """Raise a StoreError unless the stored rows at ``rows`` are those ``runtime``'s checkpoint
    computes from their tokens."""
    metadata = reader.metadata(rows)
    fresh = runtime.encoder().encode([m.token_ids for m in metadata], metadata, runtime.manifest.settings.batch_size)
    stored_self = reader.read(layout.SELF_INFLUENCE, rows).astype(np.float64)
    row_error = relative_difference(runtime.row_layout, fresh.rows, reader.read(layout.ROWS, rows))
    self_error = np.abs(fresh.self_influence - stored_self) / np.maximum(np.abs(stored_self), 1e-30)
    bad = np.flatnonzero((row_error > RECOMPUTED_TOLERANCE) | (self_error > 1e-3))
    if len(bad):
        where = f" ({reader.grads})" if runtime.checkpoint else ""
        raise StoreError(f"shard {shard_id:05d}{where}: row {rows[bad[0]]} differs from its recomputation from "
                         f"its tokens ({row_error[bad[0]]:.3g} of its norm, {self_error[bad[0]]:.3g} "
                         f"relative in its self-influence)")
