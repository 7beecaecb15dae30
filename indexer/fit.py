"""`attribdb fit`: create a database and fit its EK-FAC factors on a corpus sample."""

from __future__ import annotations

from pathlib import Path

from attribdb import faults, layout
from attribdb.coverage import measure_coverage, refuse_untracked_experts
from attribdb.errors import ConfigError
from attribdb.factors import Factors
from attribdb.fitting import fit_factors
from attribdb.gradients import GradientRunner
from attribdb.indexer import sequences
from attribdb.indexer.checkpoints import describe
from attribdb.indexer.corpus import CorpusSpec
from attribdb.indexer.writing import writing
from attribdb.manifest import Checkpoint, Manifest, exists
from attribdb.models import check_context, compute_dtype, deterministic_on, fingerprint, load_model, resolve_device
from attribdb.progress import progress_bar, say
from attribdb.row_costs import payload_budget
from attribdb.rows import PLANNING_SEQUENCES, RowProjection
from attribdb.settings import DatabaseSettings
from attribdb.tasks import CausalLMTask, collate_sequences
from attribdb.tracking import find_tracked_modules


def open_or_create(root: Path, settings: DatabaseSettings | None, overrides: dict) -> Manifest | None:
    """The existing manifest (checked against ``overrides``), or None for a new database."""
    if exists(root):
        manifest = Manifest.load(root)
        if is_stub(root, manifest):
            return None
        manifest.settings.check_unchanged(overrides)
        return manifest
    if settings is None:
        raise ConfigError(f"{root} is not a database yet: give --model to create it")
    return None


def is_stub(root: Path, manifest: Manifest) -> bool:
    """A database whose first fit was killed: no rows, and no factor files recorded as whole in the
    manifest.  Nothing in it can be reused, so the next fit or build starts it again, with the
    options it is given."""
    return not manifest.generations and not is_fitted(root, manifest)


def fit_database(root: str | Path, spec: CorpusSpec, settings: DatabaseSettings, *, device: str | None = None,
                 quiet: bool = False, refit: bool = False, checkpoints: list[Checkpoint] | None = None) -> Factors:
    """Fit factors into ``root`` (creating the database), refusing to refit under existing rows.
    ``checkpoints`` (a new trajectory database's models, the first being ``settings.model_path``)
    get factors and a row layout each, fitted on the same sample."""
    root = Path(root)
    with writing(root):
        return _fit(root, spec, settings, device, quiet, refit, checkpoints or [])


def _fit(root: Path, spec: CorpusSpec, settings: DatabaseSettings, device: str | None, quiet: bool,
         refit: bool, checkpoints: list[Checkpoint]) -> Factors:
    manifest = Manifest.load(root) if exists(root) else None
    if manifest is not None and not is_stub(root, manifest):
        checkpoints = manifest.checkpoints  # a refit keeps the database's models
    payload_bytes = payload_budget(settings.row_bytes, settings.max_length, max(1, len(checkpoints)))  # refused
    #                                                                              before any model loads
    resolved = resolve_device(device)
    deterministic_on(resolved)
    model, tokenizer = load_model(settings.model_path, resolved, settings.dtype)
    check_context(model, settings.max_length)
    model_fingerprint = fingerprint(model)
    task = CausalLMTask(settings.module_patterns)
    modules = find_tracked_modules(model, task.module_patterns)
    coverage = measure_coverage(model, modules)
    if settings.module_patterns is None:
        refuse_untracked_experts(coverage)
    if manifest is not None and not is_stub(root, manifest):
        manifest.require_model(model_fingerprint)
        if not refit:
            raise ConfigError(f"{root} already has factors; pass --refit to fit them again")
        if manifest.generations:
            raise ConfigError(f"{root} already holds rows computed with its factors; refitting would make them "
                              "inconsistent: build a new database instead")
    else:
        manifest = Manifest(settings, model_fingerprint, settings.model_path, modules, block_coverage=coverage.share,
                            checkpoints=checkpoints)
        if checkpoints:
            say(describe(checkpoints), quiet)
        (root / layout.FACTORS_DIR).mkdir(parents=True, exist_ok=True)
    for c in range(manifest.checkpoint_count):  # until every file is written: a kill in between leaves a stub
        manifest.holder(c).factor_digests, manifest.holder(c).rows = {}, None
    manifest.save(root)

    say(f"reading {spec.path} ...", quiet)
    plan = sequences.plan(spec, tokenizer, settings)
    say(plan.summary, quiet)
    sample = sequences.sample(spec, tokenizer, settings, plan.sequences)
    batches = [collate_sequences([list(s.token_ids) for s in sample[i:i + settings.batch_size]],
                                 tokenizer.pad_token_id) for i in range(0, len(sample), settings.batch_size)]
    fitted = _fit_checkpoint(root, manifest, 0, model, batches, payload_bytes, resolved, quiet)
    for c in range(1, manifest.checkpoint_count):
        holder = manifest.holder(c)
        other, other_tokenizer = load_model(holder.model_path, resolved, settings.dtype)
        if find_tracked_modules(other, task.module_patterns) != modules:
            raise ConfigError(f"checkpoint {holder.model_path} tracks other layers than {settings.model_path}: the "
                              "checkpoints of a database must share one architecture")
        if other_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"checkpoint {holder.model_path} has another tokenizer than {settings.model_path}: the "
                              "sequences are stored once, as the model's tokenizer splits them")
        holder.model_fingerprint = fingerprint(other)
        _fit_checkpoint(root, manifest, c, other, batches, payload_bytes, resolved, quiet)
        del other
    manifest.save(root)
    return fitted


def _fit_checkpoint(root: Path, manifest: Manifest, checkpoint: int, model, batches: list, payload_bytes: int,
                    device, quiet: bool) -> Factors:
    """Fit one checkpoint's factors and row layout on the sample's ``batches`` and write them."""
    settings = manifest.settings
    task = CausalLMTask(settings.module_patterns)
    sequences_fitted = sum(len(b["input_ids"]) for b in batches)
    strategy = settings.factor_config.kind
    passes = int(strategy.uses_eigenbasis) + int(strategy.measures_diagonal)
    label = f" ({manifest.checkpoints[checkpoint].name})" if manifest.checkpoints else ""
    with progress_bar(f"fit {settings.strategy} factors{label}", sequences_fitted * passes, quiet) as advance:
        factors = fit_factors(model, task, batches, settings.factor_config, manifest.modules, device=device,
                              dtype=compute_dtype(settings.dtype), progress=advance)
    runner = GradientRunner(model, task, manifest.modules, device=device, dtype=compute_dtype(settings.dtype))
    planning = -(-PLANNING_SEQUENCES // settings.batch_size)  # batches of the fit sample the row layout is chosen on
    say(f"choosing the row layout{label} ...", quiet)
    projection = RowProjection.fit(factors, payload_bytes, (runner.train_captures(b)[0] for b in batches[:planning]),
                                   settings.normalized_index, settings.fit_seed)
    # factors, then projections, then the manifest that names the layout and both files' digests: a
    # kill in between leaves a database that is_fitted() calls unfitted, and the next build fits again
    layout.factors_dir(root, checkpoint).mkdir(parents=True, exist_ok=True)
    factors.save(layout.factors_path(root, checkpoint))
    faults.point("factors-saved")
    projection.save(layout.projection_path(root, checkpoint))
    manifest.holder(checkpoint).rows = projection.layout.to_dict()
    manifest.record_factor_files(root, checkpoint)
    manifest.save(root)
    return factors


def is_fitted(root: Path, manifest: Manifest) -> bool:
    """Factors, row projections, and the manifest's row layout and factor digests all written for
    every checkpoint (the fit's last step); whether the files still match their digests is checked
    on every load."""
    return all(manifest.holder(c).rows is not None and bool(manifest.holder(c).factor_digests)
               and all(path.is_file() for path in layout.factor_files(root, c))
               for c in range(manifest.checkpoint_count))
