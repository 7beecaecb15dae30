"""`attribdb build` and `attribdb append`: corpus → sharded, resumable rows.

The corpus is read as a numbered stream; shard ``k`` of a generation holds
sequences ``[k·S, (k+1)·S)`` and is written by one process in commit units.
Re-running the same command after a crash (even ``kill -9``) finds the
unfinished generation in the manifest, skips sealed shards, and continues each
open shard from its last commit, so the result equals an uninterrupted build.
Under torchrun, rank r writes the shards with ``k mod world == r``; the rows
are the same as a single process writes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from attribdb import db_index, faults, layout
from attribdb.errors import ConfigError
from attribdb.indexer import checkpoints as checkpoint_specs
from attribdb.indexer import sequences
from attribdb.indexer.corpus import CorpusSpec
from attribdb.indexer.distributed import World, join, leave
from attribdb.indexer.fit import fit_database, is_fitted, open_or_create
from attribdb.indexer.writing import writing
from attribdb.inspection import existing_shards
from attribdb.manifest import Generation, Manifest
from attribdb.progress import progress_bar, say
from attribdb.runtime import Runtime
from attribdb.settings import DatabaseSettings
from attribdb.shard import ShardReader, ShardWriter


@dataclass
class BuildResult:
    generation: Generation
    seconds: float
    sequences_computed: int  # by this process, this run (0 when everything was already built)

    def summary(self) -> str:
        g = self.generation
        return (f"{g.sequences} sequences from {g.documents} documents in {g.shards} shards "
                f"({self.sequences_computed} computed in {self.seconds:.1f}s)")


def build_database(root: str | Path, spec: CorpusSpec, settings: DatabaseSettings | None = None, *,
                   overrides: dict | None = None, append: bool = False, model_path: str | None = None,
                   device: str | None = None, quiet: bool = False,
                   checkpoints: checkpoint_specs.CheckpointSpec | None = None) -> BuildResult:
    """Build (or resume building) ``spec`` into ``root``; ``append`` adds it to a built database.

    ``settings`` are used when the database does not exist yet; ``overrides``
    (options the user gave explicitly) must agree with a stored database.  ``checkpoints``: the
    other checkpoints of a trajectory database (indexer/checkpoints.py); a stored database must
    have been built with the same ones.
    """
    root = Path(root)
    world = join()
    try:
        with writing(root) if world.is_leader else nullcontext():
            return _build(root, spec, settings, overrides or {}, append, model_path, world.device(device), quiet,
                          world, checkpoints or checkpoint_specs.CheckpointSpec())
    finally:
        leave(world)


def _build(root, spec, settings, overrides, append, model_path, device, quiet, world: World,
           checkpoints: checkpoint_specs.CheckpointSpec) -> BuildResult:
    started = time.time()
    if world.is_leader:
        manifest = open_or_create(root, settings, overrides)
        if append and manifest is None:
            raise ConfigError(f"{root} is not a database: build it before appending")
        if manifest is None and settings is None:  # the stub of a killed first fit, and no --model
            raise ConfigError(f"{root} holds only a fit that was interrupted: give --model (and any other options) "
                              "to start it again")
        if manifest is None or not is_fitted(root, manifest):  # new, or the stub of a killed first fit
            settings = settings or manifest.settings
            models = checkpoint_specs.resolve(settings.model_path, checkpoints)
            fit_database(root, spec, settings, device=device, quiet=quiet, checkpoints=models)
        elif checkpoints.given:
            _require_checkpoints(root, manifest, checkpoint_specs.resolve(manifest.model_path, checkpoints))
    world.barrier()
    runtimes = Runtime.load_all(root, device=device, model_path=model_path)
    runtime = runtimes[0]
    settings = runtime.manifest.settings
    say(f"reading {spec.path} ...", quiet or not world.is_leader)
    plan = sequences.plan(spec, runtime.tokenizer, settings)
    say(plan.summary, quiet or not world.is_leader)
    if world.is_leader:
        _register_generation(root, spec, plan, append)
    world.barrier()
    spec_dict = sequences.corpus_spec_dict(spec)
    generation = _generation_of(Manifest.load(root), spec_dict)
    computed = _write_shards(runtimes, spec, generation, world, quiet)
    world.barrier()
    if world.is_leader:
        _update_database_indexes(root, [r.projection for r in runtimes], quiet)
        if generation.state == "building":
            manifest = Manifest.load(root)
            _generation_of(manifest, spec_dict).state = "complete"
            manifest.save(root)
    generation.state = "complete"
    return BuildResult(generation, time.time() - started, computed)


def _require_checkpoints(root: Path, manifest: Manifest, given: list) -> None:
    """A built database's checkpoints cannot change: the checkpoints given must be those it holds."""
    held = [(c.name, c.step, c.weight) for c in manifest.checkpoints]
    if [(c.name, c.step, c.weight) for c in given] != held:
        names = ", ".join(f"{name} (weight {weight:g})" for name, _, weight in held) or "none but its model"
        raise ConfigError(f"{root} holds the checkpoints {names}; a built database's checkpoints and weights cannot "
                          "change (leave out the checkpoint options to resume or append, or build a new database)")


def _update_database_indexes(root: Path, projections: list, quiet: bool) -> None:
    """Add the sealed shards to each checkpoint's database-wide FAISS index when the index kind's
    rule wants one (attribdb/db_index.py); before the generation is marked complete, so a complete
    generation is always covered, and a killed run finishes the index when it is run again.  Index
    files retired long enough ago that no reader can still be opening them are deleted."""
    manifest = Manifest.load(root)
    readers = {shard_id: ShardReader(path, manifest.row_layout()) for shard_id, path in existing_shards(root, manifest)}
    try:
        for checkpoint, projection in enumerate(projections):
            views = {s: r.view(checkpoint, projection.layout) for s, r in readers.items()} if checkpoint else readers
            if db_index.update(root, manifest, views, projection, checkpoint):
                recorded = manifest.holder(checkpoint).database_index
                label = f" ({manifest.checkpoints[checkpoint].name})" if manifest.checkpoints else ""
                say(f"database index {recorded['kind']}{label}: {db_index.describe(recorded)}", quiet)
    finally:
        for reader in readers.values():
            reader.close()
    db_index.collect_retired(root, manifest)


def _generation_of(manifest: Manifest, spec_dict: dict) -> Generation:
    return next(g for g in reversed(manifest.generations) if sequences.same_corpus(g.corpus, spec_dict))


def _register_generation(root: Path, spec: CorpusSpec, plan: sequences.CorpusPlan, append: bool) -> None:
    """Record the generation to build, or find the unfinished one to resume."""
    manifest = Manifest.load(root)
    spec_dict = sequences.corpus_spec_dict(spec)
    pending = manifest.building()
    if pending is not None:
        if not sequences.same_corpus(pending.corpus, spec_dict):
            raise ConfigError(f"an interrupted build of {pending.corpus['path']} is unfinished in {root}; "
                              "run that command again to resume it first")
        if pending.sequences != plan.sequences:
            raise ConfigError(f"{spec.path} changed since the interrupted build ({pending.sequences} sequences "
                              f"then, {plan.sequences} now); restore it or build a new database")
        if pending.fingerprint != plan.fingerprint:
            raise ConfigError(f"{spec.path} changed since the interrupted build (same {plan.sequences} sequences, "
                              "different text or tokens); restore it or build a new database")
        return
    if any(sequences.same_corpus(g.corpus, spec_dict) for g in manifest.generations):
        if append:
            raise ConfigError(f"{spec.path} is already in {root}; appending it again would duplicate its rows")
        return  # a finished build run again: every shard is sealed, nothing to compute
    if manifest.generations and not append:
        raise ConfigError(f"{root} already holds a corpus; use `attribdb append` to add {spec.path}")
    shard_size = manifest.settings.shard_size
    manifest.generations.append(Generation(
        corpus=spec_dict, first_shard=manifest.next_shard_id(), shards=math.ceil(plan.sequences / shard_size),
        sequences=plan.sequences, documents=plan.documents, malformed=plan.malformed, fingerprint=plan.fingerprint))
    manifest.save(root)
    faults.point("generation-registered")


def _write_shards(runtimes: list[Runtime], spec: CorpusSpec, generation: Generation, world: World, quiet: bool) -> int:
    """Every shard of ``generation`` this process owns; each commit unit gets a row from every
    checkpoint's model (``runtimes``) before it is committed."""
    runtime = runtimes[0]
    settings = runtime.manifest.settings
    encoders = [r.encoder() for r in runtimes]
    mine = [k for k in range(generation.shards) if world.owns(k)]
    total = sum(min(settings.shard_size, generation.sequences - k * settings.shard_size) for k in mine)
    computed = 0
    description = "build" if world.size == 1 else f"build (rank {world.rank})"
    with progress_bar(description, total, quiet) as advance:
        for k, shard_sequences in _shards(sequences.stream(spec, runtime.tokenizer, settings), settings.shard_size):
            if not world.owns(k):
                continue
            writer = ShardWriter(layout.shard_dir(runtime.root, generation.first_shard + k), runtime.row_layout,
                                 capacity=len(shard_sequences), commit_rows=settings.commit_rows,
                                 checkpoint_layouts=tuple(r.row_layout for r in runtimes[1:]))
            try:
                if writer.sealed:
                    advance(len(shard_sequences))
                    continue
                advance(writer.committed)
                for start in range(writer.committed, len(shard_sequences), settings.commit_rows):
                    unit = shard_sequences[start:start + settings.commit_rows]
                    first = k * settings.shard_size + start
                    token_ids = [s.token_ids for s in unit]
                    block = encoders[0].encode(token_ids, [sequences.row_record(s, first + i)
                                                           for i, s in enumerate(unit)], settings.batch_size)
                    for encoder in encoders[1:]:
                        other = encoder.encode(token_ids, block.metadata, settings.batch_size)
                        block.checkpoints.append((other.rows, other.self_influence))
                    writer.append(block, start)
                    computed += len(unit)
                    advance(len(unit))
                writer.seal()
            finally:
                writer.close()
    return computed


def _shards(stream, shard_size: int):
    """(shard index, its sequences) from the numbered stream, one shard in memory at a time."""
    current, index = [], 0
    for seq in stream:
        current.append(seq)
        if len(current) == shard_size:
            yield index, current
            current, index = [], index + 1
    if current:
        yield index, current
