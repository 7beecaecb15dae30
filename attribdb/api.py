"""The Python API: ``db = attribdb.open(path)``, then ``db.query(prompt, completion)``.

The CLI calls only this module.  Heavy parts (model, FAISS indexes) load on
first use, so ``info`` and ``verify`` stay fast and need no model.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from attribdb.errors import QueryError
from attribdb.inspection import VerifyReport, database_info, verify_database, verify_recomputed
from attribdb.manifest import Manifest, exists
from attribdb.text_index import valid_text


def _as_query(item):
    """A Query from a Query, a dict or a pair; its text valid Unicode (a lone surrogate made the
    tokenizer raise a TypeError)."""
    from query.engine import Query

    if isinstance(item, Query):
        prompt, completion = item.prompt, item.completion
    elif isinstance(item, dict):
        try:
            prompt, completion = str(item["prompt"]), str(item["completion"])
        except KeyError as exc:
            raise QueryError(f"a query needs 'prompt' and 'completion', this one has {sorted(item)}") from exc
    else:
        prompt, completion = item
    return Query(valid_text(prompt), valid_text(completion))


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
        from attribdb.runtime import Runtime
        from query.engine import QueryEngine

        return QueryEngine(Runtime.load(self.path, device=self.device))

    def query(self, prompt: str, completion: str, k: int = 10, candidates: int | None = None,
              opponents: bool = True, rank_by: str | None = None, rescore: int | None = None):
        """The k training sequences that most increased (and, as opponents, decreased) the completion's likelihood."""
        return self.query_batch([(prompt, completion)], k=k, candidates=candidates, opponents=opponents,
                                rank_by=rank_by, rescore=rescore)[0]

    def query_batch(self, queries: Iterable, k: int = 10, candidates: int | None = None, opponents: bool = True,
                    rank_by: str | None = None, rescore: int | None = None):
        """Many queries sharing one forward/backward pass; items are (prompt, completion) or dicts.
        ``candidates``: rows FAISS hands to rescoring per end (default 128, or k if larger);
        ``rank_by``: "normalized" (the default: the cosine form of the influence) or "score" (the
        paper's influence itself, which favours rows with large gradients);
        ``rescore``: how many of each end's best candidates are recomputed in full and ranked by
        their exact score (default: as many as a fixed compute budget per query allows; 0: none,
        the compressed answer in milliseconds)."""
        candidates = self._candidates(k, candidates)  # checked before the model loads
        _check_count("rescore", rescore, minimum=0)
        return self.engine.query([_as_query(q) for q in queries], k=k, candidates=candidates,
                                 opponents=opponents, rank_by=rank_by, rescore=rescore)

    def exact(self, prompt: str, completion: str, k: int = 10, candidates: int | None = None, rank_by: str | None = None):
        """Every candidate recomputed in full and ranked by its exact score, plus per-token contributions."""
        return self.exact_batch([(prompt, completion)], k=k, candidates=candidates, rank_by=rank_by)[0]

    def exact_batch(self, queries: Iterable, k: int = 10, candidates: int | None = None, rank_by: str | None = None):
        candidates = self._candidates(k, candidates)
        return self.engine.exact([_as_query(q) for q in queries], k=k, candidates=candidates,
                                 rank_by=rank_by)

    @cached_property
    def text_search(self):
        from query.text import TextSearch

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
        only, ranked by ``rank_by``: the TF-IDF filter of Grosse et al. (2023) for large corpora."""
        return self.prefilter_batch([(prompt, completion)], n=n, k=k, rank_by=rank_by, bm25_query=bm25_query)[0]

    def prefilter_batch(self, queries: Iterable, n: int = 100, k: int = 10, rank_by: str | None = None,
                        bm25_query: str | None = None):
        from query.text import prefiltered

        _check_count("k", k)
        _check_count("n", n)
        return prefiltered(self.engine, self.text_search, [_as_query(q) for q in queries], n=n, k=k,
                           rank_by=rank_by, bm25_query=bm25_query)

    def exhaustive(self, queries: Iterable, k: int = 10, quiet: bool = True, rank_by: str | None = None):
        """Every row recomputed on the fly: slow, exact, the ground truth."""
        _check_count("k", k)
        return self.engine.exhaustive([_as_query(q) for q in queries], k=k, quiet=quiet, rank_by=rank_by)

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

    @staticmethod
    def _candidates(k: int, candidates: int | None) -> int:
        from query.engine import DEFAULT_CANDIDATES

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
    from attribdb.settings import DatabaseSettings
    from indexer.build import build_database
    from indexer.corpus import CorpusSpec

    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    given = {key: value for key, value in settings.items() if value is not None}
    new_settings = DatabaseSettings(model_path=str(Path(model).resolve()), **given) if model else None
    return build_database(path, spec, new_settings, overrides=given, append=append,
                          model_path=str(Path(model).resolve()) if model else None, device=device, quiet=quiet)


def fit(path: str | Path, corpus: str, model: str, *, device: str | None = None, quiet: bool = False,
        refit: bool = False, corpus_options: dict | None = None, **settings):
    """Create a database and fit its factors (``build`` does this itself when needed)."""
    from attribdb.settings import DatabaseSettings
    from indexer.corpus import CorpusSpec
    from indexer.fit import fit_database, open_or_create

    given = {key: value for key, value in settings.items() if value is not None}
    existing = open_or_create(Path(path), None, given) if exists(path) else None
    new_settings = existing.settings if existing else DatabaseSettings(model_path=str(Path(model).resolve()), **given)
    spec = CorpusSpec(path=str(corpus), **(corpus_options or {}))
    return fit_database(path, spec, new_settings, device=device, quiet=quiet, refit=refit)
