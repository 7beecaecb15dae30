"""`attribdb info` and `attribdb verify`: what a database holds, and whether it is whole.

``verify`` reads everything: every Zarr chunk (their CRC32C codec fails on a
flipped byte), every LMDB row, the journal and the FAISS index, and checks
that manifest, Zarr, LMDB and FAISS agree; it stops at the first problem.
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
from attribdb.shard import ShardReader

def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


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
    """Counts, sizes on disk, settings and the energy the rank kept, as a JSON-able dict."""
    root = Path(root)
    manifest = Manifest.load(root)
    sizes = {"factors": _size(root / layout.FACTORS_DIR), "zarr": 0, "lmdb": 0, "faiss": 0}
    rows, energy_sums, tail_energy_sums = 0, np.zeros(len(manifest.modules)), np.zeros(len(manifest.modules))
    for _, path in existing_shards(root, manifest):
        sizes["zarr"] += _size(path / layout.GRADS_ZARR)
        sizes["lmdb"] += _size(path / layout.META_LMDB)
        sizes["faiss"] += _size(path / layout.FAISS_FILE)
        reader = ShardReader(path, manifest.row_layout())
        try:
            rows += reader.rows
            if reader.rows:
                energy = reader.read(layout.ENERGY).astype(np.float64)
                energy_sums += energy.sum(0)
                if manifest.settings.tail_rank:
                    tail_energy_sums += _energy_with_tail(reader, energy).sum(0)
        finally:
            reader.close()
    dense_bytes = 4 * sum(m.d_in * m.d_out for m in manifest.modules)
    return {
        "path": str(root),
        "model": {"path": manifest.settings.model_path, "fingerprint": manifest.model_fingerprint},
        "sequences": rows,
        "documents": sum(g.documents or 0 for g in manifest.generations),
        "shards": len(manifest.shard_ids),
        "generations": [{"corpus": g.corpus["path"], "state": g.state, "sequences": g.sequences,
                         "malformed": g.malformed} for g in manifest.generations],
        "bytes": sizes | {"total": _size(root)},
        "bytes_per_sequence": (sizes["zarr"] / rows) if rows else None,
        "dense_float32_bytes_per_sequence": dense_bytes,
        "energy_kept": {m.name: float(energy_sums[i] / rows) if rows else None
                        for i, m in enumerate(manifest.modules)},
        "energy_kept_with_tail": {m.name: float(tail_energy_sums[i] / rows)
                                  for i, m in enumerate(manifest.modules)} if rows and manifest.settings.tail_rank else None,
        "settings": manifest.settings.to_dict(),
    }


def _energy_with_tail(reader: ShardReader, energy: np.ndarray) -> np.ndarray:
    """(rows, modules) energy of head and tail together: the head's, scaled by the σ² the tail adds."""
    head = (reader.read(layout.SIGMA).astype(np.float64) ** 2).sum(-1)
    tail = (reader.read(layout.TAIL_SIGMA).astype(np.float64) ** 2).sum(-1)
    scale = np.divide(head + tail, head, out=np.ones_like(head), where=head > 0)
    return np.minimum(energy * scale, 1.0)


@dataclass
class VerifyReport:
    shards: int
    rows: int
    pending: str | None = None  # an unfinished fit or build: what is committed and how to resume


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
    manifest.check_factor_files(root)
    factors = Factors.load(layout.factors_path(root))
    if [m.name for m in factors.modules] != [m.name for m in manifest.modules]:
        raise StoreError("factors and manifest track different modules")
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
        for array_name in layout.row_arrays(manifest.settings.tail_rank):
            data = _read_checked(reader, array_name, name)
            if len(data) != reader.rows:
                raise StoreError(f"{name}: {array_name} has {len(data)} rows, LMDB committed {reader.rows}")
            if not np.isfinite(data.astype(np.float64)).all():
                raise StoreError(f"{name}: {array_name} holds non-finite values")
        _verify_metadata(reader, name, (shard_id - generation.first_shard) * manifest.settings.shard_size)
        if reader.sealed:
            _verify_index(reader, name)
        return reader.rows
    finally:
        reader.close()


def _read_checked(reader: ShardReader, array_name: str, name: str) -> np.ndarray:
    """Read an array one chunk at a time: a corrupted chunk is named by its rows, and no
    concurrent sibling read is left failing in zarr's event loop when we stop."""
    parts = []
    try:
        block = reader.group[array_name].chunks[0]
    except Exception as exc:  # zarr and json raise many types on damaged metadata
        raise StoreError(f"{name}: {array_name}/zarr.json cannot be read ({type(exc).__name__})") from None
    for start in range(0, reader.rows, block):
        rows = np.arange(start, min(start + block, reader.rows))
        try:
            parts.append(reader.read(array_name, rows))
        except StoreError as exc:  # names the file already
            raise StoreError(f"{name}: {array_name} rows {rows[0]}-{rows[-1]}: {exc}") from None
        except Exception as exc:  # the checksum codec and zarr raise several types
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
            raise StoreError(f"{name}: {array_name} rows {rows[0]}-{rows[-1]} cannot be read "
                             f"(corrupted chunk: {reason})") from exc
    array = reader.group[array_name]
    return np.concatenate(parts) if parts else np.zeros((0,) + array.shape[1:], dtype=array.dtype)


def _verify_metadata(reader: ShardReader, name: str, first_sequence: int) -> None:
    """Every record passes its checksum, and row i holds sequence ``first_sequence + i``."""
    for row in range(reader.rows):
        meta = reader.metadata([row])[0]
        for key in ("doc_id", "source", "token_span", "text", "token_ids", "sequence"):
            if key not in meta:
                raise StoreError(f"{name}: row {row} metadata has no {key}")
        if meta["sequence"] != first_sequence + row:
            raise StoreError(f"{name}: row {row} holds sequence {meta['sequence']} of its corpus, "
                             f"not {first_sequence + row}: rows were written out of place")
        if row not in reader.document_rows(meta["doc_id"]):
            raise StoreError(f"{name}: document {meta['doc_id']!r} does not list its row {row}")
    journal = [entry for entry in reader.journal() if entry["rows_end"] <= reader.rows]  # a writer may be ahead
    ends = [entry["rows_end"] for entry in journal]
    starts = [entry["rows_start"] for entry in journal]
    if (ends[-1:] or [0])[0] != reader.rows or starts != ([0] + ends[:-1])[:len(journal)]:
        raise StoreError(f"{name}: the commit journal does not cover rows 0..{reader.rows} contiguously: "
                         f"{json.dumps(journal[-3:])}")


def _verify_index(reader: ShardReader, name: str) -> None:
    index = reader.index()  # missing, failing its checksum or unreadable: a StoreError naming the file
    if index.ntotal != reader.rows:
        raise StoreError(f"{name}: FAISS holds {index.ntotal} vectors, LMDB committed {reader.rows}")
    if reader.rows and hasattr(index, "reconstruct_n") and type(index).__name__ == "IndexFlatIP":
        if not np.array_equal(index.reconstruct_n(0, reader.rows), reader.faiss_vectors()):
            raise StoreError(f"{name}: FAISS vectors differ from the Zarr sketches")
