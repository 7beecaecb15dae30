"""Stored rows the way a user feels them: databases built through the product, judged against exhaustive.

For each trained causal LM (the demo model, the 4×256 "second" model, and a model trained on real
man-page text: tools/evaluations/realtext.py) and each row budget (``--rows 32768 16384``: what
``attribdb build --row-bytes`` takes, all-in), one database is
built with ``attribdb.build`` and queried through ``attribdb.open``, as a user would, and compared
with the ground truth, ``exhaustive`` (every row recomputed, uncompressed):

- ``Spearman`` / ``Pearson``: of the stored-row scores (``rescore=0``: an index query with k and
  candidates equal to the row count returns every row; checked) with the exact scores over all
  rows, per query, then averaged; ``Spearman cos``: the same for the normalized score the default
  ranking uses.
- ``R@10 r=0`` / ``R@10 default``: recall of the top 10 of a plain ``rescore=0`` query, and of the
  default query, against the exhaustive top 10 (the same, default ranking).
- ``LDS``, where the model has retrained halves (tools/evaluations/lds.py: the real-text model):
  of the exact scores of every row, of the stored-row scores of every row, and of the default
  answers (the k hits and k opponents a default query returns, every other document scored 0;
  beside it the exhaustive answer cut the same way, which is what the default answer can reach).
- ``bytes/row``: ``attribdb info``'s bytes per sequence of the row store and the FAISS index (the
  two that grow with the representation), and ``all-in``: everything the database holds, factors
  and the text index included, divided by its rows.
- ``p50``: of single default queries and single ``rescore=0`` queries, on one thread: wall clock
  and the process's CPU time (on a shared machine the wall clock also counts other people's work).

``--models realtext-trajectory``: the real-text model's training run again, with the model saved
after a quarter, half and three quarters of its steps, as two trajectory databases of those
checkpoints and the final model (``--checkpoint-weights uniform`` and ``lr``), each judged like a
model of its own against its own exhaustive pass, on the same retrained halves: does influence
summed over training predict retraining better than the final model's?

The exhaustive scores depend on the model, the corpus and the fit settings, which every
representation of a model shares, not on the rows: they are computed once per model (on its first
database) and cached beside its databases, as are the databases themselves, so a rerun with a new
representation pays only for that one.

Run: OMP_NUM_THREADS=1 python -m tools.evaluations.eval_rows [--models demo second realtext]
[--rows 32768 16384] [--workdir /work/cache/models] [--lds-workdir /work/cache/lds]
[--json rows.json] [--quick].  The trained models are reused from --workdir (trained there on first
use, tools/evaluations/trained_models.py) and --lds-workdir (the real-text world and its retrained
halves; the halves are trained on first use, about 40 s of one core each).  The second model's exhaustive pass
is the slow part: 4,620 rows of a 4×256 GPT-2, one pass per 20 queries, 20+ minutes each on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tools.evaluations.lds import LDSConfig, Retrainings, add_lds_options, spearman
from tools.evaluations.measures import pearson
from tools.evaluations.realtext import RealTextConfig, corpus_tokens, real_text_world, recipe

DEFAULT_ROWS = ("32768",)
BUILD = {"max_length": 128, "fit_sample_size": 512, "batch_size": 8}  # the demo's; every model here is 128 wide


@dataclass(frozen=True)
class Representation:
    """Rows at a byte budget: what ``--row-bytes`` chooses."""

    row_bytes: int

    @classmethod
    def parse(cls, text: str) -> "Representation":
        return cls(int(text))

    @property
    def label(self) -> str:
        return f"rows:{self.row_bytes}"


@dataclass(frozen=True)
class Subject:
    """A trained model with its corpus and queries, and, where measured, its retrained halves."""

    name: str
    corpus: Path
    model_dir: Path
    queries: list  # (prompt, completion)
    retrainings: Retrainings | None = None
    build: dict = field(default_factory=lambda: dict(BUILD))

    @property
    def key(self) -> str:
        """Folder of this model's databases: a new model or corpus never reuses old ones, nor a
        trajectory database one of other checkpoints or weights."""
        digest = hashlib.sha256()
        for path in (self.corpus, *sorted(self.model_dir.glob("*.json"))):
            digest.update(path.read_bytes())
        if "checkpoints" in self.build:  # not in single-model keys, which name databases built before trajectories
            digest.update(json.dumps(self.build, sort_keys=True).encode())
        return f"{self.model_dir.name}-{digest.hexdigest()[:10]}"


@dataclass(frozen=True)
class EvalConfig:
    representations: tuple[Representation, ...]
    dbdir: Path
    k: int = 10
    latency_queries: int = 10  # default queries timed on a model without LDS (with LDS: every query)


# ---- the models ----------------------------------------------------------------------


def fact_subject(make, workdir: Path, queries: int) -> Subject:
    from tools.evaluations.measures import round_robin

    trained = make(workdir)
    facts = round_robin(trained.facts, queries)
    return Subject(trained.name, trained.corpus, trained.model_dir, [(f.prompt, f.completion) for f in facts])


def realtext_subject(workdir: Path, world_config: RealTextConfig, lds_config: LDSConfig) -> Subject:
    world = real_text_world(workdir, world_config, progress=False)
    retrainings = Retrainings(world, lds_config)
    return Subject(world.name, world.corpus, world.model_dir, retrainings.queries, retrainings)


def realtext_trajectory_subjects(workdir: Path, world_config: RealTextConfig, lds_config: LDSConfig) -> list[Subject]:
    """The real-text model's training run again, saving the model after a quarter, half and three
    quarters of its steps (the evaluation worlds' steps 200, 400 and 600 of 800, chosen before any
    run), as two trajectory databases of those checkpoints and the final model: weighted uniformly
    and by the learning rate at each checkpoint (TracIn's two weightings)."""
    from tools.evaluations.worlds import rerun_with_checkpoints

    world = real_text_world(workdir, world_config, progress=False)
    retrainings = Retrainings(world, lds_config)
    config = recipe(world_config, corpus_tokens(world.corpus, world.tokenizer_dir))
    steps = tuple(config.train_steps * quarter // 4 for quarter in (1, 2, 3))
    run = rerun_with_checkpoints(world.corpus, world.model_dir.parent / "model-checkpoints", config,
                                 world.model_dir, steps)
    checkpoints = [str(run / f"checkpoint-{step}") for step in steps]
    return [Subject(f"{world.name}, trajectory of steps {', '.join(map(str, steps))} and "
                    f"{config.train_steps}, {weights}", world.corpus, run, retrainings.queries, retrainings,
                    build={**BUILD, "checkpoints": checkpoints, "checkpoint_weights": weights})
            for weights in ("uniform", "lr")]


def subjects(args) -> list[Subject]:
    from tools.evaluations.trained_models import demo_model, second_model

    made = {"demo": lambda: [fact_subject(demo_model, args.workdir, args.queries)],
            "second": lambda: [fact_subject(second_model, args.workdir, args.queries)],
            "realtext": lambda: [realtext_subject(args.lds_workdir, args.world, args.lds)],
            "realtext-trajectory": lambda: realtext_trajectory_subjects(args.lds_workdir, args.world, args.lds)}
    return [subject for name in args.models for subject in made[name]()]


# ---- through the product ----------------------------------------------------------------


def build(subject: Subject, representation: Representation, dbdir: Path) -> Path:
    """The database of ``subject`` with rows of ``representation`` (built once, then reused)."""
    from attribdb import api

    path = dbdir / subject.key / representation.label.replace(":", "-")
    api.build(path, str(subject.corpus), str(subject.model_dir), quiet=True,
              row_bytes=representation.row_bytes, **subject.build)
    return path


def row_key(hit) -> tuple:
    """A row's name in every database built over the same corpus at the same settings."""
    return hit.doc_id, tuple(hit.token_span)


@dataclass
class Scores:
    """Every row's score and normalized score per query, columns in ``keys`` order."""

    keys: list
    score: torch.Tensor  # (queries, rows)
    normalized: torch.Tensor

    @classmethod
    def from_results(cls, results, keys: list | None = None) -> "Scores":
        keys = keys if keys is not None else sorted(row_key(h) for h in results[0].hits)
        column = {key: i for i, key in enumerate(keys)}
        score = torch.full((len(results), len(keys)), float("nan"), dtype=torch.float64)
        normalized = score.clone()
        for q, result in enumerate(results):
            if len({row_key(h) for h in result.hits}) != len(keys):
                raise RuntimeError(f"query {q} returned {len(result.hits)} rows, not every one of the {len(keys)}")
            for hit in result.hits:
                score[q, column[row_key(hit)]] = hit.score
                normalized[q, column[row_key(hit)]] = hit.normalized_score
        return cls(keys, score, normalized)

    def answer(self, k: int) -> list[list[tuple]]:
        """Per query, the rows the answer of ``k`` hits and ``k`` opponents (by normalized score)
        would hold, with their scores: the exhaustive answer a default query aims at."""
        out = []
        for q in range(self.score.shape[0]):
            order = torch.argsort(self.normalized[q], descending=True).tolist()
            out.append([(self.keys[i], float(self.score[q, i])) for i in order[:k] + order[-k:]])
        return out


def exhaustive_scores(db, subject: Subject, path: Path) -> tuple[Scores, float]:
    """The exact score of every row for every query, from ``exhaustive`` with k = the row count, and
    the seconds that pass took (both cached beside the databases)."""
    cache = path.parent / "exhaustive.pt"
    digest = hashlib.sha256(json.dumps(subject.queries).encode()).hexdigest()
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)  # tensors, lists, tuples and strings: no code runs
        if saved["queries"] == digest:
            return Scores(saved["keys"], saved["score"], saved["normalized"]), saved["seconds"]
    started = time.time()
    scores = Scores.from_results(db.exhaustive(subject.queries, k=db.info()["sequences"], quiet=True))
    seconds = time.time() - started
    torch.save({"queries": digest, "keys": scores.keys, "score": scores.score, "normalized": scores.normalized,
                "seconds": seconds}, cache)
    return scores, seconds


def stored_scores(db, subject: Subject, keys: list) -> Scores:
    """Every row's score from the stored rows alone: k = candidates = the row count, rescore=0."""
    rows = len(keys)
    return Scores.from_results(db.query_batch(subject.queries, k=rows, candidates=rows, rescore=0, opponents=False,
                                              quiet=True), keys)


@dataclass
class Timings:
    """Seconds per query: wall clock (what a user waits on an idle core) and this process's CPU
    time (the same on one thread, but unmoved by other work on a shared machine)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def p50(self) -> dict:
        return {"wall": statistics.median(self.wall), "cpu": statistics.median(self.cpu)}


def timed_answers(db, queries: list, rescore: int | None) -> tuple[list, Timings]:
    """Single queries, one at a time as a user sends them; one untimed first query loads the model
    and the indexes."""
    db.query(*queries[0], rescore=rescore)
    results, timings = [], Timings()
    for prompt, completion in queries:
        wall, cpu = time.perf_counter(), time.process_time()
        results.append(db.query(prompt, completion, rescore=rescore))
        timings.wall.append(time.perf_counter() - wall)
        timings.cpu.append(time.process_time() - cpu)
    return results, timings


# ---- measures ------------------------------------------------------------------------------


def correlations(approx: Scores, truth: Scores) -> dict:
    """Per-query Spearman and Pearson over all rows, averaged over queries."""
    per_query = range(truth.score.shape[0])
    return {"spearman": statistics.fmean(spearman(approx.score[q], truth.score[q]) for q in per_query),
            "pearson": statistics.fmean(pearson(approx.score[q], truth.score[q]) for q in per_query),
            "spearman_cos": statistics.fmean(spearman(approx.normalized[q], truth.normalized[q]) for q in per_query)}


def recall_at(results, truth: Scores, k: int) -> float:
    """Mean share of the exhaustive top k (default ranking: normalized) that each answer's top k holds."""
    values = []
    for q, result in enumerate(results):
        wanted = {truth.keys[i] for i in torch.argsort(truth.normalized[q], descending=True)[:k].tolist()}
        values.append(len(wanted & {row_key(h) for h in result.hits[:k]}) / k)
    return statistics.fmean(values)


def answer_rows(results) -> list[list[tuple]]:
    """Per query, the rows of a returned answer (hits and opponents) with the score it ranked them by."""
    return [[(row_key(h), h.final_score) for h in r.hits + r.opponents] for r in results]


def lds_of_rows(retrainings: Retrainings, per_query_rows: list[list[tuple]]) -> dict:
    """The LDS, plain and centred (lds.lds), of per-query (row key, score) lists: each document
    scored by the sum over its rows, 0 if absent."""
    scores = retrainings.doc_scores([[(key[0], s) for key, s in rows] for rows in per_query_rows])
    return {"plain": asdict(retrainings.lds(scores)), "centred": asdict(retrainings.lds(scores, centred=True))}


def all_rows(scores: Scores) -> list[list[tuple]]:
    return [list(zip(scores.keys, scores.score[q].tolist())) for q in range(scores.score.shape[0])]


def row_bytes(info: dict) -> dict:
    per = info["bytes_per_sequence"]
    return {"row_and_index": per["zarr"] + per["faiss"], "all_in": info["bytes"]["total"] / info["sequences"],
            "per_sequence": per}


# ---- one model ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def evaluate_representation(subject: Subject, representation: Representation, config: EvalConfig,
                            truth_of) -> dict:
    """Every figure of one representation of one model."""
    from attribdb import api

    started = time.time()
    path = build(subject, representation, config.dbdir)
    built = time.time() - started
    with api.open(path) as db:
        truth = truth_of(db, path)
        stored = stored_scores(db, subject, truth.keys)
        plain = db.query_batch(subject.queries, k=config.k, rescore=0, opponents=False, quiet=True)
        timed = subject.queries if subject.retrainings else subject.queries[:config.latency_queries]
        default, default_timings = timed_answers(db, timed, rescore=None)
        _, plain_timings = timed_answers(db, subject.queries[:config.latency_queries], rescore=0)
        info = db.info()
    figures = {"representation": representation.label, "rows": len(truth.keys), "bytes": row_bytes(info),
               "row": info["row"], **correlations(stored, truth),
               f"recall@{config.k}_rescore0": recall_at(plain, truth, config.k),
               f"recall@{config.k}_default": recall_at(default, truth, config.k),
               "default_queries_timed": len(timed), "p50_default_s": default_timings.p50(),
               "p50_rescore0_s": plain_timings.p50(), "rescored_default": statistics.fmean(
                   r.rescored for r in default), "build_s": built, "seconds": time.time() - started}
    if subject.retrainings:
        figures["lds_rescore0"] = lds_of_rows(subject.retrainings, all_rows(stored))
        figures["lds_default"] = lds_of_rows(subject.retrainings, answer_rows(default))
    log(f"{subject.name} {representation.label}: {figures['seconds']:.0f}s")
    return figures


def evaluate(subject: Subject, config: EvalConfig) -> dict:
    """Every representation of one model, and the figures of its ground truth."""
    truth_cache: dict = {}

    def truth_of(db, path):
        if "scores" not in truth_cache:
            truth_cache["scores"], truth_cache["seconds"] = exhaustive_scores(db, subject, path)
        return truth_cache["scores"]

    results = [evaluate_representation(subject, r, config, truth_of) for r in config.representations]
    truth = truth_cache["scores"]
    header = {"model": subject.name, "rows": len(truth.keys), "queries": len(subject.queries),
              "exhaustive_s": truth_cache["seconds"], "self_check": correlations(truth, truth)}
    if subject.retrainings:
        retrainings = subject.retrainings
        header["lds_exact"] = lds_of_rows(retrainings, all_rows(truth))
        header["lds_exact_answer"] = lds_of_rows(retrainings, truth.answer(config.k))
        header["lds_constant"] = asdict(retrainings.lds(torch.ones(len(subject.queries), len(retrainings.doc_ids))))
        header["noise_ceiling"] = {"plain": asdict(retrainings.noise_ceiling()),
                                   "centred": asdict(retrainings.noise_ceiling(centred=True))}
        header["halves"] = retrainings.config.halves
        header["noise_halves"] = retrainings.config.noise_halves
        header["seeds"] = retrainings.config.seeds
    return {"header": header, "representations": results}


# ---- output ---------------------------------------------------------------------------------


def lds_text(figure: dict | None, variant: str = "plain") -> str:
    """"mean ± standard error" of a Summary, or of one variant of a plain/centred pair."""
    if not figure:
        return "—"
    figure = figure.get(variant, figure)
    return f"{figure['mean']:.3f} ± {figure['standard_error']:.3f}"


def seconds_text(p50: dict) -> str:
    return f"{p50['wall']:.2f}/{p50['cpu']:.2f}s"


def print_table(tables: list[dict], k: int) -> None:
    columns = ("representation", "bytes/row", "all-in", "Spearman", "Pearson", "Spear. cos", f"R@{k} r=0",
               f"R@{k} dflt", "p50 dflt wall/cpu", "p50 r=0 wall/cpu", "LDS r=0", "LDS default", "LDS r=0 c.",
               "LDS dflt c.")
    widths = (16, 10, 10, 9, 9, 10, 9, 9, 17, 16, 15, 15, 15, 15)
    for table in tables:
        h = table["header"]
        print(f"\n== {h['model']}: {h['rows']} rows, {h['queries']} queries; exhaustive pass {h['exhaustive_s']:.0f}s")
        if "lds_exact" in h:
            for variant in ("plain", "centred"):
                print(f"LDS ({variant}) over {h['halves']} halves × {h.get('seeds', 1)} seeds: exact scores "
                      f"{lds_text(h['lds_exact'], variant)}, exhaustive answer (top/bottom {k}) "
                      f"{lds_text(h['lds_exact_answer'], variant)}; noise ceiling ({h['noise_halves']} halves, "
                      f"two ensembles) {lds_text(h['noise_ceiling'], variant)}")
            print(f"LDS of a constant score: {lds_text(h['lds_constant'])}")
        print("  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
        for r in table["representations"]:
            cells = (r["representation"], f"{r['bytes']['row_and_index']:,.0f}", f"{r['bytes']['all_in']:,.0f}",
                     f"{r['spearman']:.3f}", f"{r['pearson']:.3f}", f"{r['spearman_cos']:.3f}",
                     f"{r[f'recall@{k}_rescore0']:.3f}", f"{r[f'recall@{k}_default']:.3f}",
                     seconds_text(r["p50_default_s"]), seconds_text(r["p50_rescore0_s"]),
                     lds_text(r.get("lds_rescore0")), lds_text(r.get("lds_default")),
                     lds_text(r.get("lds_rescore0"), "centred"), lds_text(r.get("lds_default"), "centred"))
            print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


QUICK_WORLD = RealTextConfig(documents=120, queries=8, docs_per_page=3, epochs=4.0)
QUICK_WORLD = replace(QUICK_WORLD, model=replace(QUICK_WORLD.model, vocab_size=512, n_layer=1, n_embd=32, n_head=2,
                                                 batch_size=8))
QUICK_LDS = LDSConfig(halves=6, noise_halves=3)
QUICK_ROWS = ("4096",)
QUICK_BUILD = {"max_length": 128, "fit_sample_size": 64, "batch_size": 8}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("demo", "second", "realtext", "realtext-trajectory"),
                        default=["demo", "second", "realtext"],
                        help="realtext-trajectory: the real-text model's run as trajectory databases of four "
                             "checkpoints, weighted uniformly and by learning rate")
    parser.add_argument("--rows", nargs="+", metavar="BYTES",
                        help=f"row budgets, all-in "
                             f"(default: {' '.join(DEFAULT_ROWS)}; --quick: {' '.join(QUICK_ROWS)})")
    parser.add_argument("--workdir", type=Path, default=Path("/work/cache/models"),
                        help="where the demo and second models are cached (tools/evaluations/trained_models.py)")
    parser.add_argument("--lds-workdir", type=Path, default=Path("/work/cache/lds"),
                        help="where the real-text world, its retrained halves and every database are cached")
    parser.add_argument("--queries", type=int, default=50, help="fact queries of the demo and second models")
    parser.add_argument("--latency-queries", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny real-text world (1×32 GPT-2, 120 documents, 8 queries, 6 halves) "
                             "and small rows")
    add_lds_options(parser)
    args = parser.parse_args(argv)
    args.world = RealTextConfig()
    args.lds = LDSConfig(halves=args.halves, noise_halves=args.noise_halves, seeds=args.seeds)
    if args.quick:
        args.models = [m for m in args.models if m.startswith("realtext")] or ["realtext"]
        args.world, args.lds = QUICK_WORLD, replace(QUICK_LDS, seeds=args.seeds)
    args.rows = args.rows or list(QUICK_ROWS if args.quick else DEFAULT_ROWS)
    return args


def run(args) -> list[dict]:
    """Every model in turn; each model's table printed, and the JSON rewritten, as soon as it is
    done, so a long model (the second one's exhaustive pass) never holds back the others' figures."""
    config = EvalConfig(tuple(Representation.parse(r) for r in args.rows), args.lds_workdir / "databases",
                        latency_queries=args.latency_queries)
    tables = []
    for subject in subjects(args):
        if args.quick:
            subject = replace(subject, build={**subject.build, **QUICK_BUILD})
        log(f"{subject.name}: {len(subject.queries)} queries")
        tables.append(evaluate(subject, config))
        print_table(tables[-1:], config.k)
        sys.stdout.flush()
        if args.json:
            args.json.write_text(json.dumps(tables, indent=1))
    return tables


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    run(args)
    print(f"\n{time.time() - started:.0f}s in all")


if __name__ == "__main__":
    main()
