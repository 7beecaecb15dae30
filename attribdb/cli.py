"""The `attribdb` command: a thin click layer over :mod:`attribdb.api`.

Errors a user can cause arrive as :class:`~attribdb.errors.AttribdbError` and
leave as one ``Error: ...`` line with exit code 1; heavy imports happen inside
the commands so ``--help`` and shell completion stay instant.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from attribdb.errors import AttribdbError
from attribdb.plan import SHAPES
from attribdb.query.options import HYBRID, RANK_BY, QueryOptions


class FriendlyGroup(click.Group):
    """Turns domain errors into one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttribdbError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: committed rows are kept; run the same command to resume", err=True)
            sys.exit(130)


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="attribdb")
def main():
    """attribdb: which training sequences made this model produce this completion?"""


def settings_options(func):
    """One option per DatabaseSettings field (but the model), with its help string."""
    from attribdb.settings import DatabaseSettings

    types = {bool: click.BOOL, int: int, float: float, str: str}
    for field in reversed(dataclasses.fields(DatabaseSettings)):
        if field.name == "model_path":
            continue
        help_text = field.metadata.get("help", "")
        if field.default is not None:
            help_text += f"  [new databases: {field.default}]"
        name = "--" + field.name.replace("_", "-")
        if field.name == "module_patterns":
            func = click.option("--modules", "module_patterns", multiple=True, help=help_text)(func)
            continue
        base = next((t for t in types if t.__name__ in str(field.type)), str)
        func = click.option(name, field.name, type=types[base], default=None, help=help_text)(func)
    return func


def corpus_options(func):
    func = click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
                        help="what to do with a malformed corpus record (either way they are counted)")(func)
    func = click.option("--id-field", default="id", show_default=True, help="field or column with document ids")(func)
    func = click.option("--text-field", default="text", show_default=True, help="field or column with the text")(func)
    func = click.option("--corpus-format", default="auto", show_default=True,
                        type=click.Choice(["auto", "jsonl", "text-files", "text-lines", "parquet", "arrow"]),
                        help="how to read the corpus")(func)
    func = click.option("--corpus", required=True, type=click.Path(exists=True),
                        help="corpus: JSONL, text files, Parquet or a saved datasets folder")(func)
    return func


def checkpoint_options(func):
    """A trajectory database's other checkpoints (indexer/checkpoints.py)."""
    func = click.option("--checkpoint-weights", default="auto", show_default=True,
                        help="each checkpoint's weight in the summed influence: uniform (1 each), lr (the learning "
                             "rate at its step, from its trainer_state.json or attribdb's Trainer callback), auto "
                             "(lr when every checkpoint records one, else uniform), or numbers such as 0,1,0.5: one "
                             "per checkpoint, --model's first")(func)
    func = click.option("--checkpoints-from", type=click.Path(exists=True, file_okay=False),
                        help="a Trainer output folder: each of its checkpoint-N/ folders is a checkpoint")(func)
    func = click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, file_okay=False),
                        help="another checkpoint of the model's training run (repeatable): its influence is summed "
                             "with the model's; the sequences are stored once")(func)
    return func


def _corpus(kwargs) -> tuple[str, dict]:
    options = {"format": kwargs.pop("corpus_format"), "text_field": kwargs.pop("text_field"),
               "id_field": kwargs.pop("id_field"), "on_error": kwargs.pop("on_error")}
    return kwargs.pop("corpus"), options


def _settings(kwargs) -> dict:
    patterns = kwargs.pop("module_patterns", ())
    kwargs["module_patterns"] = tuple(patterns) if patterns else None
    return kwargs


device_option = click.option("--device", default=None, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
quiet_option = click.option("--quiet", is_flag=True, help="no progress bars")
db_argument = click.argument("db", type=click.Path(file_okay=False))


@main.command()
@db_argument
@corpus_options
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="local model folder")
@settings_options
@checkpoint_options
@click.option("--refit", is_flag=True, help="fit again although factors exist (only before any build)")
@device_option
@quiet_option
def fit(db, model, refit, device, quiet, checkpoints, checkpoints_from, checkpoint_weights, **kwargs):
    """Create DB and fit its EK-FAC factors on a sample of the corpus."""
    from attribdb import api

    corpus, options = _corpus(kwargs)
    factors = api.fit(db, corpus, model, device=device, quiet=quiet, refit=refit, corpus_options=options,
                      checkpoints=checkpoints, checkpoints_from=checkpoints_from,
                      checkpoint_weights=checkpoint_weights, **_settings(kwargs))
    click.echo(f"fitted {factors.config.strategy} factors for {len(factors.modules)} modules on "
               f"{factors.info.get('n_sequences', 0)} sequences into {db}")


@main.command()
@db_argument
@corpus_options
@click.option("--model", type=click.Path(exists=True, file_okay=False),
              help="local model folder (required for a new database)")
@settings_options
@checkpoint_options
@device_option
@quiet_option
def build(db, model, device, quiet, checkpoints, checkpoints_from, checkpoint_weights, **kwargs):
    """Build DB from a corpus (fits factors first if needed; re-run to resume)."""
    from attribdb import api

    corpus, options = _corpus(kwargs)
    result = api.build(db, corpus, model, device=device, quiet=quiet, corpus_options=options,
                       checkpoints=checkpoints, checkpoints_from=checkpoints_from,
                       checkpoint_weights=checkpoint_weights, **_settings(kwargs))
    click.echo(f"built {db}: {result.summary()}")


@main.command()
@db_argument
@corpus_options
@click.option("--model", type=click.Path(exists=True, file_okay=False),
              help="model folder (default: the database's); must be the same weights")
@device_option
@quiet_option
def append(db, model, device, quiet, **kwargs):
    """Add the documents of another corpus to DB as new shards."""
    from attribdb import api

    corpus, options = _corpus(kwargs)
    result = api.build(db, corpus, model, append=True, device=device, quiet=quiet, corpus_options=options)
    click.echo(f"appended to {db}: {result.summary()}")


@main.command()
@db_argument
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def info(db, as_json):
    """Counts, sizes on disk, settings and what a row keeps."""
    from attribdb import api

    data = api.open(db).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    mib = 1 << 20
    b = data["bytes"]
    click.echo(f"{data['path']}: {data['sequences']} sequences, {data['documents']} documents, {data['shards']} shards")
    click.echo(f"model      {data['model']['path']} ({data['model']['fingerprint'][:12]})")
    for c in data["checkpoints"] or []:
        row = f", row {c['row']['bytes'] / 1024:.1f} KiB keeping {c['row']['kept']:.3f}" if c["row"] else ""
        click.echo(f"checkpoint {c['name']}: step {c['step'] if c['step'] is not None else 'unknown'}, weight "
                   f"{c['weight']:g}, {c['model']['path']} ({c['model']['fingerprint'][:12]}){row}")
    coverage = data["block_coverage"]
    click.echo(f"tracked    {data['tracked_modules']} modules, "
               + (f"{coverage:.1%} of the transformer-block parameters" if coverage is not None
                  else "share of the block parameters not recorded (database made before it was measured)"))
    click.echo(f"on disk    {b['total'] / mib:.1f} MiB in {data['files']} files (zarr {b['zarr'] / mib:.1f}, "
               f"lmdb {b['lmdb'] / mib:.1f}, faiss {b['faiss'] / mib:.1f}, text {b['text'] / mib:.1f}, "
               f"factors {b['factors'] / mib:.1f})")
    row = data["row"]
    if row:
        click.echo(f"row        {row['bytes'] / 1024:.1f} KiB: the largest singular components of each "
                   f"sequence's preconditioned gradient in 4 bits, {row['bytes'] / row['dense_float32_bytes']:.4f} "
                   f"of dense float32 Ĝ ({row['dense_float32_bytes'] / 1024:.0f} KiB)")
        click.echo(f"           keeps {row['kept']:.3f} of a fit-sample sequence's self-influence on average; "
                   f"subspaces {'whole' if row['whole_space'] else 'of the leading eigenvectors'}, "
                   f"sketch of {row['sketch_dim']} coordinates for the index")
        cost = row["all_in"]
        rows_of = f" ({len(data['checkpoints'])} checkpoints' rows)" if data["checkpoints"] else ""
        click.echo(f"all-in     {cost['total'] / 1024:.1f} KiB per row{rows_of}, as `attribdb plan` prices it "
                   f"(row store {cost['row_store'] / 1024:.1f}, index codes {cost['codes'] / 1024:.1f}, "
                   f"metadata estimate {cost['metadata'] / 1024:.1f})")
    if data["bytes_per_sequence"]:
        per = data["bytes_per_sequence"]
        click.echo(f"per row    {sum(per.values()) / 1024:.1f} KiB on disk (zarr {per['zarr'] / 1024:.1f}, "
                   f"faiss {per['faiss'] / 1024:.1f}, lmdb {per['lmdb'] / 1024:.1f}, text {per['text'] / 1024:.1f})")
    for g in data["generations"]:
        click.echo(f"corpus     {g['corpus']}: {g['sequences']} sequences, {g['malformed']} malformed, {g['state']}")
    settings = data["settings"]
    click.echo("settings   " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "model_path"))


@main.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False),
              help="local model folder (reads its config only)")
@click.option("--shape", type=click.Choice(list(SHAPES)),
              help="a named model shape instead of a folder  [default: all of them]")
@click.option("--rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="database size to price")
@click.option("--row-bytes", type=int, default=None, help="row budget, as for build  [default: a new database's]")
@click.option("--max-length", type=int, default=None,
              help="tokens per sequence, as for build: the metadata estimate  [default: a new database's]")
@click.option("--checkpoints", type=click.IntRange(min=1), default=1, show_default=True,
              help="models of a trajectory database (the model and its other checkpoints), which share the budget")
def plan(model, shape, rows, row_bytes, max_length, checkpoints):
    """What a row and a database of --rows rows will cost all-in for a model, before building."""
    from attribdb import api

    plans = api.plan(model, shape=shape, row_bytes=row_bytes, max_length=max_length, checkpoints=checkpoints)
    parts = f"a row and its index codes for each of {checkpoints} checkpoints, and the sequence's" \
        if checkpoints > 1 else "the row, its index codes and its"
    click.echo(f"rows costing {plans[0].row_bytes} bytes all-in (--row-bytes): {parts} metadata (estimated at "
               f"max-length {plans[0].max_length})")
    click.echo(f"{'model':<24} {'modules':>7} {'dense Ĝ':>10} {'row store':>10} {'codes':>8} {'metadata':>9} "
               f"{'all-in':>8} {f'{rows:,} rows':>14}")
    for p in plans:
        c = p.cost
        click.echo(f"{p.label:<24} {p.modules:>7} {p.dense_bytes / 2**20:>8.0f}Mi {c.row_store / 1024:>8.1f}Ki "
                   f"{c.codes / 1024:>6.1f}Ki {c.metadata / 1024:>7.1f}Ki {c.total / 1024:>6.1f}Ki "
                   f"{_binary_size(p.database_bytes(rows)):>14}")


def _binary_size(n: float) -> str:
    for unit in ("B", "Ki", "Mi", "Gi"):
        if n < 1024:
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}Ti"


VERIFY_PENDING_EXIT = 3


@main.command()
@db_argument
@click.option("--deep", type=click.IntRange(min=0), default=0, show_default=True,
              help="also recompute this many rows, spread over the database, from their tokens (loads the model)")
@device_option
def verify(db, deep, device):
    """Check that manifest, Zarr, LMDB and FAISS agree and every checksum holds.

    Exit status: 0 whole; 1 damaged (one line names the first problem); 3 consistent so far,
    but a build is in progress or was interrupted (the line says how to resume it)."""
    from attribdb import api

    report = api.open(db, device=device).verify(deep=deep)
    if report.pending:
        click.echo(f"{report.pending} ({report.rows} rows in {report.shards} shards verified)")
        sys.exit(VERIFY_PENDING_EXIT)
    recomputed = f"; {report.recomputed} recomputed from their tokens and equal" if deep else ""
    click.echo(f"ok: {report.rows} rows in {report.shards} shards verified{recomputed}")


def _load_queries(prompt, completion, queries_file) -> list[dict]:
    if queries_file:
        from attribdb.errors import QueryError

        items = []
        try:
            lines = Path(queries_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise QueryError(f"{queries_file} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QueryError(f"{queries_file}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(item, dict) or "prompt" not in item or "completion" not in item:
                raise QueryError(f"{queries_file}:{number}: each line needs a 'prompt' and a 'completion'")
            items.append(item)
        return items
    if prompt is None or completion is None:
        raise click.UsageError("give --prompt and --completion, or --queries FILE.jsonl")
    return [{"prompt": prompt, "completion": completion}]


def _prefilter_size(ctx, param, value: str | None) -> int | None:
    """N of ``--prefilter bm25:N``."""
    if value is None:
        return None
    kind, _, size = value.partition(":")
    if kind != "bm25" or not size.isdecimal() or int(size) < 1:
        raise click.BadParameter(f"expected bm25:N with N a positive whole number (e.g. bm25:100), not {value!r}")
    return int(size)


@main.command()
@db_argument
@click.option("--prompt", help="the prompt the model saw")
@click.option("--completion", help="the completion to explain (keep its leading space)")
@click.option("--queries", "queries_file", type=click.Path(exists=True, dir_okay=False),
              help="JSONL file of {\"prompt\", \"completion\"} objects")
@click.option("-k", "--top", "k", type=int, default=10, show_default=True)
@click.option("--candidates", type=int, default=None,
              help="rows FAISS hands to stored-row scoring per end [default: 128, or k if larger]")
@click.option("--rank-by", type=click.Choice([*RANK_BY, HYBRID]), default=RANK_BY[0], show_default=True,
              help="normalized: the cosine form of the influence, which does not favour rows with large "
                   "gradients; score: the influence itself (the paper's ranking); hybrid (with --prefilter "
                   "only): reciprocal-rank fusion of the BM25 order and the normalized influence order")
@click.option("--rescore", type=int, default=None,
              help="index mode: recompute this many of each end's best candidates in full and rank them by their "
                   "exact score [default: as many as a fixed compute budget per query allows; 0: none]")
@click.option("--mode", type=click.Choice(["index", "exact", "exhaustive", "text"]), default="index",
              show_default=True,
              help="index: FAISS over the stored rows, the best rescored in full; exact: every candidate recomputed "
                   "in full, with per-token contributions; exhaustive: every row on the fly (slow ground truth); "
                   "text: BM25 over the rows' text alone (no influence, no model)")
@click.option("--prefilter", callback=_prefilter_size, metavar="bm25:N",
              help="compute influence exactly on the BM25 top N rows only (the paper's TF-IDF filter), then rank "
                   "them by --rank-by")
@click.option("--bm25-query", type=click.Choice(["prompt+completion", "prompt"]), default="prompt+completion",
              show_default=True, help="the text BM25 searches with (--mode text and --prefilter)")
@click.option("--doc", "doc_ids", multiple=True, metavar="ID",
              help="instead of the top rows, score this document (repeatable): each of its rows with its exact "
                   "score, per-token contributions and the rank it has in the index answer (-k, --candidates, "
                   "--rescore and --mode do not apply)")
@click.option("--checkpoints", "checkpoint_names", metavar="NAME,...",
              help="a trajectory database's checkpoints to sum the influence over [default: all of them]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "html"]), default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="write to this file instead of stdout")
@device_option
@quiet_option
def query(db, prompt, completion, queries_file, k, candidates, rank_by, rescore, mode, prefilter, bm25_query, doc_ids,
          checkpoint_names, fmt, output, device, quiet):
    """Which training sequences most influenced COMPLETION after PROMPT?

    Answers are written as they are ready (JSON: one line per query; HTML: one page at the end);
    a --queries batch shows its progress on stderr when that is a terminal."""
    from attribdb import api
    from attribdb.query.formats import write

    if prefilter and mode in ("exhaustive", "text"):
        raise click.UsageError(f"--prefilter picks the rows that exact influence scores; it does not go with "
                               f"--mode {mode}")
    if rank_by == HYBRID and not prefilter:
        raise click.UsageError("--rank-by hybrid fuses the BM25 and influence orders of the BM25 top N rows: "
                               "give --prefilter bm25:N")
    if mode == "text" and completion is None:
        completion = ""  # BM25 alone can search with a prompt only
    items = _load_queries(prompt, completion, queries_file)
    # a bar for a batch on a terminal only: where stderr is captured, an error stays one line
    quiet = quiet or not queries_file or not sys.stderr.isatty()
    if doc_ids and (mode != "index" or prefilter):
        raise click.UsageError("--doc scores the named documents exactly and ranks them as the index would: "
                               "leave out --mode and --prefilter")
    names = tuple(name.strip() for name in checkpoint_names.split(",") if name.strip()) if checkpoint_names else None
    options = QueryOptions(k=k, candidates=candidates, rescore=rescore, rank_by=rank_by, checkpoints=names)
    with api.open(db, device=device) as database:
        if doc_ids:
            results = (database.score(item["prompt"], item["completion"], doc_ids, options=options) for item in items)
        elif prefilter:
            results = database.prefilter_batch(items, prefilter, bm25_query=bm25_query, options=options)
        elif mode == "text":
            results = database.text_batch(items, bm25_query=bm25_query, options=options)
        elif mode == "exhaustive":
            results = database.exhaustive(items, quiet=quiet, options=options)
        elif mode == "exact":
            results = database.exact_iter(items, quiet=quiet, options=options)
        else:
            results = database.query_iter(items, quiet=quiet, options=options)
        if output:
            with open(output, "w", encoding="utf-8") as handle:
                write(results, fmt, handle)
            click.echo(f"wrote {output}", err=True)
        else:
            write(results, fmt, sys.stdout)


@main.command()
@db_argument
@device_option
def shell(db, device):
    """Keep DB loaded and answer queries interactively (PROMPT || COMPLETION per line)."""
    from attribdb import api
    from attribdb.query.shell import run_shell

    with api.open(db, device=device) as database:
        sys.exit(run_shell(database))


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="attribdb-demo", show_default=True,
              help="where the corpus, model and database go (reused on the next run)")
@click.option("--quick", is_flag=True, help="a reduced run (small corpus and model) for CI")
@quiet_option
def demo(workdir, quick, quiet):
    """Generate a corpus, train a tiny model, build a database and trace facts back to their documents."""
    from attribdb.demo.run import run_demo

    run_demo(Path(workdir), quick=quick, quiet=quiet)
