"""The Python API: ``db = attribdb.open(path)``, then ``db.query(prompt, completion)``.

The CLI calls only this module.  Heavy parts (model, FAISS indexes) load on
first use, so ``info`` and ``verify`` stay fast and need no model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from attribdb.errors import ConfigError, QueryError
from attribdb.inspection import VerifyReport, database_info, verify_database, verify_recomputed
from attribdb.manifest import Manifest, exists
from attribdb.query.options import BOTH, QueryOptions, as_queries, as_query, check_count


class Database:
    """An attribution database on disk."""

    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)  # fails early, with a clear message, on a wrong path
        self.device = device

    @cached_property
    def engine(self):
        from attribdb.query.engine import QueryEngine
        from attribdb.runtime import Runtime

        return QueryEngine(Runtime.load(self.path, device=self.device))

    # Every query method takes its options as keywords (QueryOptions' fields: k, candidates, rescore,
    # rank_by, opponents, contributions), or whole as ``options=``, checked before the model loads.

    def query(self, prompt: str, completion: str, *, options: QueryOptions | None = None, **fields):
        """The k training sequences that most increased (and, as opponents, decreased) the completion's likelihood."""
        return self.query_batch([(prompt, completion)], options=options, quiet=True, **fields)[0]

    def query_batch(self, queries: Iterable, *, quiet: bool = False, options: QueryOptions | None = None, **fields):
        """Many queries, items (prompt, completion) or dicts; a list of results in their order.
        ``candidates``: rows FAISS hands on per end (default 128, or k if larger);
        ``rank_by``: "normalized" (the default: the cosine form of the influence) or "score" (the
        paper's influence itself, which favours rows with large gradients);
        ``rescore``: how many of each end's best candidates are recomputed in full and ranked by
        their exact score (default: as many as a fixed compute budget per query allows; 0: none,
        the stored rows' ranking, no training row recomputed); ``quiet``: no progress bar on stderr."""
        return list(self.query_iter(queries, quiet=quiet, options=options, **fields))

    def query_iter(self, queries: Iterable, *, quiet: bool = False, options: QueryOptions | None = None,
                   **fields) -> Iterator:
        """query_batch's results one by one as their chunk finishes: a caller that writes each
        away holds one chunk of queries in memory, however long the batch."""
        chosen = QueryOptions.of("index", options, **fields)
        return self.engine.query(as_queries(queries), chosen, quiet)

    def exact(self, prompt: str, completion: str, *, options: QueryOptions | None = None, **fields):
        """Every candidate recomputed in full and ranked by its exact score, plus per-token contributions."""
        return self.exact_batch([(prompt, completion)], options=options, quiet=True, **fields)[0]

    def exact_batch(self, queries: Iterable, *, quiet: bool = False, options: QueryOptions | None = None, **fields):
        """exact() for many queries: a list of results in their order."""
        return list(self.exact_iter(queries, quiet=quiet, options=options, **fields))

    def exact_iter(self, queries: Iterable, *, quiet: bool = False, options: QueryOptions | None = None,
                   **fields) -> Iterator:
        """exact_batch's results one by one as their chunk finishes (see query_iter)."""
        chosen = QueryOptions.of("exact", options, **fields)
        return self.engine.exact(as_queries(queries), chosen, quiet)

    def exhaustive(self, queries, completion: str | None = None, *, quiet: bool = False,
                   options: QueryOptions | None = None, **fields):
        """Every row recomputed on the fly and scored uncompressed: slow, exact, the ground truth.

        Like query when given a prompt and a completion (one result), like query_batch when given
        a list (a list of results).  Each chunk of queries is one pass over the corpus, so a
        batch costs fewer passes than its queries would one by one.  ``rank_by="both"`` ranks
        each pass both ways: ``{"normalized": ..., "score": ...}``, each what that ranking alone
        would return."""
        chosen = QueryOptions.of("exhaustive", options, **fields)
        single = isinstance(queries, str)
        if single and completion is None:
            raise QueryError("give a completion after the prompt, or a list of (prompt, completion) pairs")
        if not single and completion is not None:
            raise QueryError("a completion goes with one prompt, not with a list of queries")
        answer = self.engine.exhaustive([as_query((queries, completion))] if single else as_queries(queries), chosen,
                                        quiet)
        if single:
            answer = {ranking: results[0] for ranking, results in answer.items()}
        return answer if chosen.rank_by == BOTH else answer[chosen.rank_by]

    @cached_property
    def text_search(self):
        from attribdb.query.text import TextSearch

        return TextSearch(self.path)

    def text(self, prompt: str, completion: str = "", *, bm25_query: str | None = None,
             options: QueryOptions | None = None, **fields):
        """The k rows that best match the query's words by BM25 (no model needed): text retrieval
        to set against influence.  ``bm25_query``: "prompt+completion" (the default) or "prompt"."""
        return self.text_batch([(prompt, completion)], bm25_query=bm25_query, options=options, **fields)[0]

    def text_batch(self, queries: Iterable, *, bm25_query: str | None = None, options: QueryOptions | None = None,
                   **fields):
        chosen = QueryOptions.of("text", options, **fields)
        return self.text_search.search(as_queries(queries), k=chosen.k, bm25_query=bm25_query)

    def prefilter(self, prompt: str, completion: str, n: int = 100, *, bm25_query: str | None = None,
                  options: QueryOptions | None = None, **fields):
        """Influence computed exactly (full EK-FAC, from the stored tokens) on the BM25 top ``n`` rows
        only, ranked by ``rank_by``: the TF-IDF filter of Grosse et al. (2023) for large corpora.
        ``rank_by="hybrid"``: ranked by the reciprocal-rank fusion of their BM25 order and their
        exact normalized influence order (``Hit.fused``; no token contributions), query/text.py."""
        return self.prefilter_batch([(prompt, completion)], n, bm25_query=bm25_query, options=options, **fields)[0]

    def prefilter_batch(self, queries: Iterable, n: int = 100, *, bm25_query: str | None = None,
                        options: QueryOptions | None = None, **fields):
        from attribdb.query.text import prefiltered

        chosen = QueryOptions.of("prefilter", options, **fields)
        check_count("n", n)
        return prefiltered(self.engine, self.text_search, as_queries(queries), n, chosen, bm25_query)

    def score(self, prompt: str, completion: str, doc_ids: Iterable[str], *, options: QueryOptions | None = None,
              **fields):
        """Where the named documents rank for this query, and why: a result (mode "score") with
        one hit per row of those documents, ordered by rank.  Each hit has its exact score and
        normalized score, per-token contributions, and as ``rank`` the place the row would have
        in the index answer ranked by ``rank_by`` (its position among all rows by the compressed
        key; query/named.py).  An id no row belongs to is a QueryError."""
        from attribdb.query.named import score_documents

        chosen = QueryOptions.of("score", options, **fields)
        if isinstance(doc_ids, str):
            raise QueryError("doc_ids is a list of document ids, not one string")
        return score_documents(self.engine, as_query((prompt, completion)), list(doc_ids), chosen)

    def self_influence(self, top: int = 10):
        """The rows with the largest self-influence (outliers)."""
        check_count("top", top)
        return self.engine.top_self_influence(top)

    def info(self) -> dict:
        return database_info(self.path)

    def verify(self, deep: int = 0) -> VerifyReport:
        """Every checksum and cross-reference; with ``deep``, also that many rows recomputed from
        their tokens and compared with what is stored."""
        report = verify_database(self.path)
        if deep and not report.pending:
            report.recomputed = verify_recomputed(self.path, deep, self.device)
        return report

    def close(self) -> None:
        for name in ("engine", "text_search"):
            if name in self.__dict__:
                self.__dict__.pop(name).close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | Path, device: str | None = None) -> Database:  # noqa: A001 - the API's name
    """Open the database at ``path`` (device: 'auto', 'cpu', 'cuda', ...)."""
    return Database(path, device=device)


def build(path: str | Path, corpus: str, model: str | None = None, *, append: bool = False,
          device: str | None = None, quiet: bool = False, corpus_options: dict | None = None,
          checkpoints: Iterable[str] = (), checkpoints_from: str | None = None, checkpoint_weights: str = "auto",
          **settings):
    """Build (or resume, or with ``append`` extend) a database from a corpus and a local model folder.

    ``checkpoints`` (model folders) and ``checkpoints_from`` (a Trainer output folder: every
    ``checkpoint-N/`` in it) make a trajectory database: a row per sequence from each checkpoint
    beside ``model``'s, one copy of the sequences, and queries that sum the influence over them;
    ``checkpoint_weights``: ``"uniform"`` (1 each), ``"lr"`` (each checkpoint's learning rate),
    ``"auto"`` (``"lr"`` when every checkpoint records one, else ``"uniform"``) or comma-separated
    numbers, one per checkpoint, the model's first."""
    from attribdb.indexer.build import build_database
    from attribdb.indexer.corpus import CorpusSpec

    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    others = _checkpoint_spec(checkpoints, checkpoints_from, checkpoint_weights)
    if others.given and append:
        raise ConfigError("append adds rows at the checkpoints the database holds; give no checkpoints")
    given = {key: value for key, value in settings.items() if value is not None}
    new_settings = _new_settings(model, given, quiet) if model else None
    return build_database(path, spec, new_settings, overrides=given, append=append,
                          model_path=str(Path(model).resolve()) if model else None, device=device, quiet=quiet,
                          checkpoints=others)


def _new_settings(model: str | Path, given: dict, quiet: bool):
    """A new database's settings; a default max-length beyond the model's context is clamped to it (a
    given one is the user's choice and is checked against the model when it loads)."""
    from attribdb.models import context_of_folder
    from attribdb.progress import say
    from attribdb.settings import DatabaseSettings

    settings = DatabaseSettings(model_path=str(Path(model).resolve()), **given)
    context = context_of_folder(model)
    if "max_length" not in given and context is not None and settings.max_length > context:
        say(f"note: max-length {settings.max_length} is beyond the model's context of {context} positions; "
            f"using {context} (give --max-length to choose)", quiet)
        settings = dataclasses.replace(settings, max_length=context)
    return settings


def plan(model: str | Path | None = None, *, shape: str | None = None, row_bytes: int | None = None,
         max_length: int | None = None, checkpoints: int = 1):
    """What a row will cost all-in for a local model folder or a named shape (every named shape
    given neither), before anything is built: a list of :class:`attribdb.plan.Plan`;
    ``checkpoints``: the models of a trajectory database, which share the budget."""
    from attribdb.plan import plan as plan_rows

    return plan_rows(model, shape, row_bytes, max_length, checkpoints)


def fit(path: str | Path, corpus: str, model: str, *, device: str | None = None, quiet: bool = False,
        refit: bool = False, corpus_options: dict | None = None, checkpoints: Iterable[str] = (),
        checkpoints_from: str | None = None, checkpoint_weights: str = "auto", **settings):
    """Create a database and fit its factors (``build`` does this itself when needed); the
    checkpoint arguments as for :func:`build`."""
    from attribdb.indexer.checkpoints import resolve
    from attribdb.indexer.corpus import CorpusSpec
    from attribdb.indexer.fit import fit_database, open_or_create

    given = {key: value for key, value in settings.items() if value is not None}
    existing = open_or_create(Path(path), None, given) if exists(path) else None
    new_settings = existing.settings if existing else _new_settings(model, given, quiet)
    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    others = _checkpoint_spec(checkpoints, checkpoints_from, checkpoint_weights)
    return fit_database(path, spec, new_settings, device=device, quiet=quiet, refit=refit,
                        checkpoints=resolve(new_settings.model_path, others))


def _checkpoint_spec(checkpoints: Iterable[str], checkpoints_from: str | None, weights: str):
    from attribdb.indexer.checkpoints import CheckpointSpec

    if isinstance(checkpoints, str):
        raise ConfigError("checkpoints is a list of model folders, not one string")
    return CheckpointSpec(tuple(str(c) for c in checkpoints or ()), str(checkpoints_from) if checkpoints_from else None,
                          weights)
