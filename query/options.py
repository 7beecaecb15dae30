"""What a caller asks: the queries, and one set of options every query mode reads.

The CLI builds a :class:`QueryOptions` from its flags and the Python API from
its keywords; both hand it to the engine, which trusts it.  A bad value is
refused here, once, with one line, before any model loads.  This module imports
nothing heavy, so the CLI can use it for its option choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from attribdb.errors import QueryError
from attribdb.text_index import valid_text

RANK_BY = ("normalized", "score")  # the rankings of every influence mode; the first is the default
BOTH = "both"  # exhaustive mode only: both rankings from one pass over the corpus
HYBRID = "hybrid"  # the BM25 prefilter only: reciprocal-rank fusion of the BM25 and influence orders (query/text.py)
OWNER_OF = {BOTH: "exhaustive", HYBRID: "prefilter"}  # the one mode that takes each of these rankings
DEFAULT_CANDIDATES = 128  # per end, whatever k is (up to k itself), so a query's top k never depends on k


@dataclass(frozen=True)
class Query:
    prompt: str
    completion: str


def as_query(item) -> Query:
    """A Query from a Query, a dict or a pair; its text valid Unicode (a lone surrogate made the
    tokenizer raise a TypeError)."""
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


def as_queries(queries) -> list[Query]:
    """A batch as Query objects, all checked before any work starts; a bare string would
    otherwise be read as a batch of one-character queries."""
    if isinstance(queries, (str, bytes)):
        raise QueryError("a batch is a list of (prompt, completion) pairs or dicts; for one query pass "
                         "the prompt and the completion as two strings")
    return [as_query(q) for q in queries]


def check_count(name: str, value, minimum: int = 1) -> None:
    """A count the caller gave (None = the default): an int of at least ``minimum``; k=-1 used to
    return every row, k=0 nothing, without a word."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise QueryError(f"{name} must be an integer of at least {minimum}, not {value!r}")


def option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class QueryOptions:
    """How a query is answered; each mode reads the fields that apply to it."""

    k: int = option(10, "rows returned per end: the most supporting and, with opponents, the most opposing")
    candidates: int | None = option(None, f"rows FAISS hands to stored-row scoring per end (None: "
                                          f"{DEFAULT_CANDIDATES}, or k if larger)")
    rescore: int | None = option(None, "how many of each end's best candidates are recomputed in full and ranked "
                                       "by their exact score (None: as many as a fixed compute budget per query "
                                       "allows; 0: none, the stored rows' ranking, no training row recomputed)")
    rank_by: str = option(RANK_BY[0], "normalized: the cosine form of the influence, which does not favour rows with "
                                      "large gradients; score: the influence itself (the paper's ranking); "
                                      f"{BOTH}: both from one exhaustive pass; {HYBRID}: the BM25 prefilter's rank "
                                      "fusion")
    opponents: bool = option(True, "also return the k most negative rows")
    contributions: bool = option(False, "split the returned rows' exact scores over their tokens (costs their "
                                        "recomputation once more)")
    checkpoints: tuple[str, ...] | None = option(None, "a trajectory database's checkpoints, by name, whose "
                                                       "influence is summed (None: all of them)")

    def __post_init__(self):
        if self.rank_by is None:  # the API's keyword for "the default"
            object.__setattr__(self, "rank_by", RANK_BY[0])
        check_count("k", self.k)
        check_count("candidates", self.candidates)
        check_count("rescore", self.rescore, minimum=0)
        rankings = RANK_BY + tuple(OWNER_OF)
        if self.rank_by not in rankings:
            raise QueryError(f"rank-by must be one of {', '.join(rankings)}, not {self.rank_by!r}")
        for name in ("opponents", "contributions"):
            if not isinstance(getattr(self, name), bool):
                raise QueryError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.checkpoints is not None:
            if not isinstance(self.checkpoints, (list, tuple)) or not self.checkpoints \
                    or not all(isinstance(c, str) for c in self.checkpoints):
                raise QueryError(f"checkpoints is a non-empty list of checkpoint names, not {self.checkpoints!r}")
            object.__setattr__(self, "checkpoints", tuple(self.checkpoints))

    @classmethod
    def of(cls, mode: str, options: QueryOptions | None = None, **fields) -> QueryOptions:
        """``options`` (default: the defaults) with ``fields`` replaced, for a query in ``mode``:
        a ranking that only another mode takes is refused here."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise QueryError(f"unknown query option {unknown[0]!r}; the options are {', '.join(sorted(known))}")
        chosen = dataclasses.replace(options or cls(), **fields)
        owner = OWNER_OF.get(chosen.rank_by)
        if owner is not None and owner != mode:
            raise QueryError(f"rank-by {chosen.rank_by} applies to {owner} mode only, not to {mode} mode")
        return chosen

    @property
    def pool(self) -> int:
        """Candidates per end: ``candidates`` (default :data:`DEFAULT_CANDIDATES`), at least ``k``."""
        return max(self.candidates or DEFAULT_CANDIDATES, self.k)

    @property
    def rankings(self) -> tuple[str, ...]:
        """The rankings to return: both for ``rank_by="both"``, else the one asked for."""
        return RANK_BY if self.rank_by == BOTH else (self.rank_by,)

    def exact(self) -> QueryOptions:
        """These options in exact mode: every candidate recomputed, the returned rows split over their tokens."""
        return dataclasses.replace(self, rescore=self.pool, contributions=True)
