"""`attribdb demo`: corpus → tiny model → database → "why did the model say this?".

Every step is cached in the work folder (the corpus by its config, the model
by config and corpus hash, the database by the model and the settings it was
built with), so a second run only answers the queries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from attribdb.demo.facts import DemoCorpusConfig, Fact, generate_corpus
from attribdb.demo.train import CACHE_FILE, DemoModelConfig, train_model
from attribdb.layout import FORMAT_VERSION
from attribdb.settings import DatabaseSettings


@dataclass(frozen=True)
class DemoConfig:
    corpus: DemoCorpusConfig  # or another world's corpus config, with its generator passed to prepare
    model: DemoModelConfig
    build: dict  # DatabaseSettings fields
    queries_per_relation: int


FULL = DemoConfig(DemoCorpusConfig(), DemoModelConfig(),
                  {"max_length": 128, "fit_sample_size": 512, "batch_size": 8}, 1)
QUICK = DemoConfig(DemoCorpusConfig(facts_per_relation=4, background_docs=120),
                   DemoModelConfig(vocab_size=1024, n_layer=1, train_steps=150, batch_size=8, fact_repeats=12),
                   {"max_length": 64, "fit_sample_size": 64, "batch_size": 8, "row_bytes": 8192}, 1)


def rank_of_first_fact_document(result, fact: Fact) -> int | None:
    """1-based rank, among distinct documents in the result, of the first one stating the fact."""
    seen: list[str] = []
    for hit in result.hits:
        if hit.doc_id not in seen:
            seen.append(hit.doc_id)
            if hit.doc_id in fact.doc_ids:
                return len(seen)
    return None


def demo_queries(facts: list[Fact], per_relation: int) -> list[Fact]:
    chosen: dict[str, list[Fact]] = {}
    for fact in facts:
        bucket = chosen.setdefault(fact.relation, [])
        if len(bucket) < per_relation:
            bucket.append(fact)
    return [f for bucket in chosen.values() for f in bucket]


@dataclass(frozen=True)
class Prepared:
    corpus: Path
    facts: list[Fact]
    model_dir: Path
    db_path: Path


def prepare(workdir: Path, config: DemoConfig, label: str, quiet: bool = False,
            generate=generate_corpus) -> Prepared:
    """Corpus, trained model and database in ``workdir``, each reused when already made.
    ``generate(out_dir, config.corpus)`` writes the corpus (another world's generator for the evaluations)."""
    from attribdb import api

    workdir.mkdir(parents=True, exist_ok=True)
    click.echo(f"1/4 corpus: writing {workdir / 'corpus'} ...", err=True)
    corpus, facts = generate(workdir / "corpus", config.corpus)
    click.echo(f"    {sum(1 for _ in open(corpus))} documents, {len(facts)} fact queries", err=True)
    click.echo("2/4 model: training a tiny GPT-2 from scratch (cached after the first run) ...", err=True)
    model_dir = train_model(corpus, workdir / "model", config.model, progress=not quiet)
    model_key = hashlib.sha256((model_dir / CACHE_FILE).read_bytes()).hexdigest()[:12]  # config and corpus
    # the database's settings, defaults included: a new default never reuses a database built under the old one
    settings = DatabaseSettings(model_path=str(model_dir.resolve()), **config.build).to_dict()
    settings_key = hashlib.sha256(json.dumps([FORMAT_VERSION, settings], sort_keys=True).encode()).hexdigest()[:8]
    db_path = workdir / f"db-{model_key}-{label}-{settings_key}"
    click.echo(f"3/4 database: building {db_path} (resumable; cached after the first run) ...", err=True)
    _drop_unreadable_cache(db_path)
    api.build(db_path, str(corpus), str(model_dir), quiet=quiet, **config.build)
    return Prepared(corpus, facts, model_dir, db_path)


def _drop_unreadable_cache(db_path: Path) -> None:
    """The demo's database is a cache: one an older attribdb wrote, which this one refuses to
    read, is built again rather than stopping the demo."""
    from attribdb.errors import StoreError
    from attribdb.manifest import Manifest, exists

    if not exists(db_path):
        return
    try:
        Manifest.load(db_path)
    except StoreError as exc:
        click.echo(f"    the cached database cannot be read by this version ({exc}); building it again", err=True)
        shutil.rmtree(db_path)


def run_demo(workdir: Path, quick: bool = False, quiet: bool = False) -> list[tuple[Fact, int | None]]:
    from attribdb import api
    from attribdb.demo.train import fact_accuracy

    started = time.time()
    config = QUICK if quick else FULL
    prepared = prepare(workdir, config, "quick" if quick else "full", quiet)
    accuracy = fact_accuracy(prepared.model_dir, prepared.facts)
    click.echo(f"    the model completes {accuracy:.0%} of the held-out fact prompts correctly", err=True)
    click.echo("4/4 queries: which documents made the model say this?", err=True)
    db_path = prepared.db_path
    outcomes = []
    with api.open(db_path) as db:
        for fact in demo_queries(prepared.facts, config.queries_per_relation):
            result = db.query(fact.prompt, fact.completion, k=30)
            rank = rank_of_first_fact_document(result, fact)
            outcomes.append((fact, rank))
            click.echo(f"\nQ: {fact.prompt!r} → {fact.completion!r}   "
                       f"({result.timings_ms['total']:.0f} ms; documents stating the fact: {', '.join(fact.doc_ids)})")
            for hit in result.hits[:5]:
                mark = "*" if hit.doc_id in fact.doc_ids else " "
                click.echo(f"  {mark} {hit.rank:>2}. cosine {hit.final_normalized_score:>6.3f}  "
                           f"score {hit.final_score:>10.4g}  "
                           f"{hit.doc_id:<16} "
                           f"{' '.join(hit.text.split())[:70]}")
            click.echo(f"  rank of the first document that states the fact: {rank if rank else 'not in top 30'}")
    click.echo(f"\ndemo finished in {time.time() - started:.0f}s. Explore: attribdb shell {db_path}   "
               f"or: attribdb query {db_path} --prompt '...' --completion ' ...' --format html --output report.html")
    return outcomes
