"""The Python API: ``db = attribdb.open(path)``, then ``db.query(prompt, completion)``.

The CLI calls only this module.  Heavy parts (model, FAISS indexes) load on
first use, so ``info`` and ``verify`` stay fast and need no model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path

from attribdb.errors import QueryError
from attribdb.inspection import VerifyReport, database_info, verify_database, verify_recomputed
from attribdb.manifest import Manifest, exists
from attribdb.progress import progress_bar
from attribdb.text_index import valid_text

# Batches run in chunks of queries whose dense gradients (one d_out × d_in matrix per tracked
# module per query, a few copies alive at once) fit in a memory budget: a 720-query batch on
# the demo held them all at once and peaked at 4.5 GB.  Results stream by chunk.
QUERY_MEMORY = 128 << 20  # index and exact modes: captures, inverse-HVP and its projection...
QUERY_COPIES = 3  # ...three gradient-sized tensors per query
MAX_CHUNK = 64  # more queries per chunk gain nothing: their forward/backward is batched already
# exhaustive: a chunk is a pass over the whole corpus, so it gets more memory to need fewer
# passes; Ĝ_q is kept through the pass, plus its rotation while it is made
EXHAUSTIVE_MEMORY = 512 << 20
EXHAUSTIVE_COPIES = 2


def _as_query(item):
    """A Query from a Query, a dict or a pair; its text valid Unicode (a lone surrogate made the
    tokenizer raise a TypeError)."""
    from attribdb.query.engine import Query

    if isinstance(item, Query):
        prompt, completion = item.prompt, item.completion
    elif isinstance(item, dict):
        try:
            prompt, completion = str(item["prompt"]), str(item["completion"])
        except KeyError as exc:
            raise QueryError(f"a query needs 'prompt' and 'completion', this one has {sorted(item)}") from exc
    else:
        try:
            prompt, completion = item
        except (TypeError, ValueError):
            raise QueryError(f"a query is a (prompt, completion) pair or a dict with both, not {item!r:.60}") from None
    return Query(valid_text(prompt), valid_text(completion))


def _as_queries(queries) -> list:
    """A batch as Query objects, all checked before any work starts; a bare string would
    otherwise be read as a batch of one-character queries."""
    if isinstance(queries, (str, bytes)):
        raise QueryError("a batch is a list of (prompt, completion) pairs or dicts; for one query pass "
                         "the prompt and the completion as two strings")
    return [_as_query(q) for q in queries]


def _check_count(name: str, value, minimum: int = 1) -> None:
    """A count the caller gave (None = the default): an int of at least ``minimum``; k=-1 used to
    return every row, k=0 nothing, without a word."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise QueryError(f"{name} must be an integer of at least {minimum}, not {value!r}")


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

    def query(self, prompt: str, completion: str, k: int = 10, candidates: int | None = None,
              opponents: bool = True, rank_by: str | None = None, rescore: int | None = None):
        """The k training sequences that most increased (and, as opponents, decreased) the completion's likelihood."""
        return self.query_batch([(prompt, completion)], k=k, candidates=candidates, opponents=opponents,
                                rank_by=rank_by, rescore=rescore, quiet=True)[0]

    def query_batch(self, queries: Iterable, k: int = 10, candidates: int | None = None, opponents: bool = True,
                    rank_by: str | None = None, rescore: int | None = None, quiet: bool = False):
        """Many queries, items (prompt, completion) or dicts; a list of results in their order.
        ``candidates``: rows FAISS hands to rescoring per end (default 128, or k if larger);
        ``rank_by``: "normalized" (the default: the cosine form of the influence) or "score" (the
        paper's influence itself, which favours rows with large gradients);
        ``rescore``: how many of each end's best candidates are recomputed in full and ranked by
        their exact score (default: as many as a fixed compute budget per query allows; 0: none,
        the compressed answer in milliseconds); ``quiet``: no progress bar on stderr."""
        return list(self.query_iter(queries, k=k, candidates=candidates, opponents=opponents, rank_by=rank_by,
                                    rescore=rescore, quiet=quiet))

    def query_iter(self, queries: Iterable, k: int = 10, candidates: int | None = None, opponents: bool = True,
                   rank_by: str | None = None, rescore: int | None = None, quiet: bool = False) -> Iterator:
        """query_batch's results one by one as their chunk finishes: a caller that writes each
        away holds one chunk of queries in memory, however long the batch."""
        candidates = self._candidates(k, candidates)  # checked before the model loads
        _check_count("rescore", rescore, minimum=0)
        return self._stream("query", _as_queries(queries), quiet, lambda chunk: self.engine.query(
            chunk, k=k, candidates=candidates, opponents=opponents, rank_by=rank_by, rescore=rescore))

    def exact(self, prompt: str, completion: str, k: int = 10, candidates: int | None = None,
              rank_by: str | None = None):
        """Every candidate recomputed in full and ranked by its exact score, plus per-token contributions."""
        return self.exact_batch([(prompt, completion)], k=k, candidates=candidates, rank_by=rank_by, quiet=True)[0]

    def exact_batch(self, queries: Iterable, k: int = 10, candidates: int | None = None, rank_by: str | None = None,
                    quiet: bool = False):
        """exact() for many queries: a list of results in their order."""
        return list(self.exact_iter(queries, k=k, candidates=candidates, rank_by=rank_by, quiet=quiet))

    def exact_iter(self, queries: Iterable, k: int = 10, candidates: int | None = None, rank_by: str | None = None,
                   quiet: bool = False) -> Iterator:
        """exact_batch's results one by one as their chunk finishes (see query_iter)."""
        candidates = self._candidates(k, candidates)
        return self._stream("exact", _as_queries(queries), quiet, lambda chunk: self.engine.exact(
            chunk, k=k, candidates=candidates, rank_by=rank_by))

    def exhaustive(self, queries, completion: str | None = None, k: int = 10, quiet: bool = False,
                   rank_by: str | None = None):
        """Every row recomputed on the fly and scored uncompressed: slow, exact, the ground truth.

        Like query when given a prompt and a completion (one result), like query_batch when given
        a list (a list of results).  Each chunk of queries is one pass over the corpus, so a
        batch costs fewer passes than its queries would one by one.  ``rank_by="both"`` ranks
        each pass both ways: ``{"normalized": ..., "score": ...}``, each what that ranking alone
        would return."""
        if isinstance(queries, str):
            if completion is None:
                raise QueryError("give a completion after the prompt, or a list of (prompt, completion) pairs")
            return self._exhaustive([_as_query((queries, completion))], k, quiet, rank_by, single=True)
        if completion is not None:
            raise QueryError("a completion goes with one prompt, not with a list of queries")
        return self._exhaustive(_as_queries(queries), k, quiet, rank_by, single=False)

    @cached_property
    def text_search(self):
        from attribdb.query.text import TextSearch

        return TextSearch(self.path)

    def text(self, prompt: str, completion: str = "", k: int = 10, bm25_query: str | None = None):
        """The k rows that best match the query's words by BM25 (no model needed): text retrieval
        to set against influence.  ``bm25_query``: "prompt+completion" (the default) or "prompt"."""
        return self.text_batch([(prompt, completion)], k=k, bm25_query=bm25_query)[0]

    def text_batch(self, queries: Iterable, k: int = 10, bm25_query: str | None = None):
        _check_count("k", k)
        return self.text_search.search([_as_query(q) for q in queries], k=k, bm25_query=bm25_query)

    def prefilter(self, prompt: str, completion: str, n: int = 100, k: int = 10, rank_by: str | None = None,
                  bm25_query: str | None = None):
        """Influence computed exactly (full EK-FAC, from the stored tokens) on the BM25 top ``n`` rows
        only, ranked by ``rank_by``: the TF-IDF filter of Grosse et al. (2023) for large corpora.
        ``rank_by="hybrid"``: ranked by the reciprocal-rank fusion of their BM25 order and their
        exact normalized influence order (``Hit.fused``; no token contributions), query/text.py."""
        return self.prefilter_batch([(prompt, completion)], n=n, k=k, rank_by=rank_by, bm25_query=bm25_query)[0]

    def prefilter_batch(self, queries: Iterable, n: int = 100, k: int = 10, rank_by: str | None = None,
                        bm25_query: str | None = None):
        from attribdb.query.text import prefiltered

        _check_count("k", k)
        _check_count("n", n)
        return prefiltered(self.engine, self.text_search, [_as_query(q) for q in queries], n=n, k=k,
                           rank_by=rank_by, bm25_query=bm25_query)

    def _exhaustive(self, queries: list, k: int, quiet: bool, rank_by: str | None, single: bool):
        from attribdb.query.engine import BOTH, RANK_BY, _check_rank_by

        _check_count("k", k)
        rankings = RANK_BY if rank_by == BOTH else (_check_rank_by(rank_by),)
        merged = {ranking: [] for ranking in rankings}
        size = self._chunk_size(EXHAUSTIVE_MEMORY, EXHAUSTIVE_COPIES, len(queries))
        for answer in self._chunks("queries", queries, size, quiet, lambda chunk: (
                self.engine.exhaustive(chunk, k=k, quiet=quiet, rank_by=BOTH if rank_by == BOTH else rankings[0]))):
            for ranking in rankings:
                merged[ranking] += answer[ranking] if rank_by == BOTH else answer
        pick = (lambda results: results[0]) if single else (lambda results: results)
        return {ranking: pick(results) for ranking, results in merged.items()} if rank_by == BOTH \
            else pick(merged[rankings[0]])

    def score(self, prompt: str, completion: str, doc_ids: Iterable[str], rank_by: str | None = None):
        """Where the named documents rank for this query, and why: a result (mode "score") with
        one hit per row of those documents, ordered by rank.  Each hit has its exact score and
        normalized score, per-token contributions, and as ``rank`` the place the row would have
        in the index answer ranked by ``rank_by`` (its position among all rows by the compressed
        key; query/named.py).  An id no row belongs to is a QueryError."""
        from attribdb.query.named import score_documents

        if isinstance(doc_ids, str):
            raise QueryError("doc_ids is a list of document ids, not one string")
        return score_documents(self.engine, _as_query((prompt, completion)), list(doc_ids), rank_by=rank_by)

    def self_influence(self, top: int = 10):
        """The rows with the largest self-influence (outliers)."""
        _check_count("top", top)
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

    def _chunk_size(self, memory: int, copies: int, most: int) -> int:
        """Queries per chunk: as many as keep ``copies`` of their dense gradients within ``memory``."""
        from attribdb.models import compute_dtype
        from attribdb.query.engine import queries_per_chunk

        return queries_per_chunk(self.manifest.modules, compute_dtype(self.manifest.settings.dtype).itemsize,
                                 memory, copies, most)

    @staticmethod
    def _chunks(description: str, queries: list, size: int, quiet: bool, run: Callable[[list], object]) -> Iterator:
        """``run`` over chunks of ``size`` queries with a progress bar of queries on stderr;
        yields each chunk's answer as it finishes."""
        with progress_bar(description, len(queries), quiet or not queries, unit="query") as advance:
            for start in range(0, len(queries), size):
                chunk = queries[start:start + size]
                yield run(chunk)
                advance(len(chunk))

    def _stream(self, description: str, queries: list, quiet: bool, run: Callable[[list], list]) -> Iterator:
        """Index or exact answers one by one, computed a chunk of queries at a time."""
        for results in self._chunks(description, queries, self._chunk_size(QUERY_MEMORY, QUERY_COPIES, MAX_CHUNK),
                                    quiet, run):
            yield from results

    @staticmethod
    def _candidates(k: int, candidates: int | None) -> int:
        from attribdb.query.engine import DEFAULT_CANDIDATES

        _check_count("k", k)
        _check_count("candidates", candidates)
        return candidates if candidates is not None else DEFAULT_CANDIDATES

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
          device: str | None = None, quiet: bool = False, corpus_options: dict | None = None, **settings):
    """Build (or resume, or with ``append`` extend) a database from a corpus and a local model folder."""
    from attribdb.indexer.build import build_database
    from attribdb.indexer.corpus import CorpusSpec

    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    given = {key: value for key, value in settings.items() if value is not None}
    new_settings = _new_settings(model, given, quiet) if model else None
    return build_database(path, spec, new_settings, overrides=given, append=append,
                          model_path=str(Path(model).resolve()) if model else None, device=device, quiet=quiet)


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
         row_kind: str | None = None, max_length: int | None = None):
    """What a row will cost all-in for a local model folder or a named shape (every named shape
    given neither), before anything is built: a list of :class:`attribdb.plan.Plan`."""
    from attribdb.plan import plan as plan_rows

    return plan_rows(model, shape, row_bytes, row_kind, max_length)


def fit(path: str | Path, corpus: str, model: str, *, device: str | None = None, quiet: bool = False,
        refit: bool = False, corpus_options: dict | None = None, **settings):
    """Create a database and fit its factors (``build`` does this itself when needed)."""
    from attribdb.indexer.corpus import CorpusSpec
    from attribdb.indexer.fit import fit_database, open_or_create

    given = {key: value for key, value in settings.items() if value is not None}
    existing = open_or_create(Path(path), None, given) if exists(path) else None
    new_settings = existing.settings if existing else _new_settings(model, given, quiet)
    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    return fit_database(path, spec, new_settings, device=device, quiet=quiet, refit=refit)
