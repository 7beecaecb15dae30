"""The full-text side of a shard: an SQLite FTS5 index of its rows' text, and BM25 over every shard.

Each sealed shard keeps ``text.sqlite``: a contentless FTS5 table with one entry per row (its rowid
is the row; the text itself stays in LMDB, so it is not stored twice).  It is written like the
shard's FAISS index: into a temporary file, renamed into place, its CRC32C recorded in LMDB by the
transaction that seals the shard.

Why SQLite FTS5 (measured on 10⁵ rows of 64 tokens, docs/evidence.md): it ships with Python; the
text indexes took 0.7% of a database build with a tiny model and 2.3% of its bytes (115 per row).
tantivy built one index as fast (3.0 s against 2.5 s for one FTS5 file), half as large, and
answered a BM25 top 100 in 3 ms where this module takes 0.2–0.3 s (FTS5's own bm25() 0.6 s): it
skips rows that cannot reach the top (block-max WAND); FTS5 reads every row holding a term.  That
is a tenth of a ``--prefilter bm25:100`` query, whose exact recomputation dominates, so the
standard library won over a compiled dependency; ``--mode text`` alone would gain from tantivy.

BM25 is computed here, not by FTS5's ``bm25()``: FTS5 scores with the statistics of the one table
it searches (row count, average length, rows holding a term), so shards of different sizes would
give scores that cannot be merged, and a ranking would depend on how the rows were sharded.  The
same formula with FTS5's constants, on statistics summed over all shards, gives every row the score
one index over the whole database would; on a one-shard database it equals ``-bm25()``.

The query's terms come from FTS5's own tokenizer (an in-memory table of the query text), so a
user's text never reaches an FTS5 query expression: no input can be an FTS5 syntax error.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from attribdb.errors import StoreError

TOKENIZER = "unicode61"  # FTS5's default (case folding, diacritics removed), named: index and query must agree
K1, B = 1.2, 0.75  # FTS5's bm25() constants
MIN_IDF = 1e-6  # FTS5's floor for terms in more than half the rows
TABLE = "rows_text"
_SCHEMA = f"CREATE VIRTUAL TABLE {TABLE} USING fts5(body, content='', tokenize='{TOKENIZER}')"
_VOCAB = ("CREATE VIRTUAL TABLE temp.vocab_row USING fts5vocab(main, {table}, 'row');"
          "CREATE VIRTUAL TABLE temp.vocab_instance USING fts5vocab(main, {table}, 'instance');")


def valid_text(text: str) -> str:
    """``text`` as valid Unicode, lone surrogates replaced: they come from JSON escapes or from bytes a
    shell could not decode, and make the sqlite3 module (and a tokenizer) raise."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _fill(connection: sqlite3.Connection, texts: Iterable[tuple[int, str]]) -> sqlite3.Connection:
    with connection:
        connection.execute(_SCHEMA)
        connection.executemany(f"INSERT INTO {TABLE}(rowid, body) VALUES (?, ?)",
                               ((row, valid_text(text)) for row, text in texts))
        connection.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES ('optimize')")  # one segment: smaller, faster
    return connection


def write(texts: Iterable[tuple[int, str]], path: Path) -> None:
    """Index ``(row, text)`` pairs into ``path``, whole or not at all: a killed writer leaves only
    the temporary file, which the resumed seal overwrites."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    connection = sqlite3.connect(tmp)
    try:
        connection.execute("PRAGMA journal_mode = OFF")  # the rename is the commit
        _fill(connection, texts)
    finally:
        connection.close()
    os.replace(tmp, path)


def _varint(blob: bytes) -> int:
    """An SQLite varint, as FTS5 stores a row's length in its docsize table."""
    value = 0
    for i, byte in enumerate(blob[:9]):
        if i == 8:
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value
    return value


class TextIndex:
    """One shard's FTS5 index opened for search: row lengths read once, term postings per query."""

    def __init__(self, connection: sqlite3.Connection, where: str):
        self.connection, self.where = connection, where
        try:
            connection.executescript(_VOCAB.format(table=TABLE))
            sizes = connection.execute(f"SELECT id, sz FROM {TABLE}_docsize").fetchall()
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(f"{where} cannot be read as a text index ({exc})") from None
        self.lengths = np.zeros(max((row for row, _ in sizes), default=-1) + 1, dtype=np.float64)
        for row, size in sizes:
            self.lengths[row] = _varint(size)
        self.rows = len(sizes)

    @classmethod
    def open(cls, path: Path) -> "TextIndex":
        """A stored index, read-only and immutable (a sealed shard's file never changes)."""
        try:
            connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"{path} cannot be opened ({exc})") from None
        return cls(connection, str(path))

    @classmethod
    def in_memory(cls, texts: Iterable[tuple[int, str]], where: str) -> "TextIndex":
        return cls(_fill(sqlite3.connect(":memory:"), texts), where)

    @property
    def tokens(self) -> float:
        return float(self.lengths.sum())

    def _all(self, sql: str, parameters=()) -> list:
        try:
            return self.connection.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where} cannot be read ({exc}): the text index is damaged") from None

    def document_frequency(self, terms: list[str]) -> np.ndarray:
        """Rows holding each term."""
        found = dict(self._all(f"SELECT term, doc FROM vocab_row WHERE term IN ({','.join('?' * len(terms))})",
                               terms))
        return np.array([found.get(term, 0) for term in terms], dtype=np.float64)

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows holding ``term``, its count in each).  One string of all its occurrences' rows,
        parsed by numpy: half the time of SQL's GROUP BY and a Python tuple per row."""
        (joined,), = self._all("SELECT group_concat(doc) FROM vocab_instance WHERE term = ?", (term,))
        rows, counts = np.unique(np.array(joined.split(",") if joined else [], dtype=np.int64), return_counts=True)
        return rows, counts.astype(np.float64)

    def vocabulary(self) -> Iterator[tuple]:
        """(term, rows holding it, occurrences), in term order: what two indexes of the same text share."""
        return iter(self._all("SELECT term, doc, cnt FROM vocab_row ORDER BY term"))

    def same_entries(self, other: "TextIndex") -> bool:
        return (self.rows == other.rows and np.array_equal(self.lengths, other.lengths)
                and list(self.vocabulary()) == list(other.vocabulary()))

    def close(self) -> None:
        self.connection.close()


class QueryTerms:
    """The distinct terms of a text as the index tokenised its rows (FTS5's own tokenizer)."""

    def __init__(self):
        self.connection = _fill(sqlite3.connect(":memory:"), [])
        self.connection.executescript(_VOCAB.format(table=TABLE))

    def __call__(self, text: str) -> list[str]:
        with self.connection:
            self.connection.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES ('delete-all')")  # contentless: no DELETE
            self.connection.execute(f"INSERT INTO {TABLE}(rowid, body) VALUES (1, ?)", (valid_text(text),))
        return [term for (term,) in self.connection.execute("SELECT term FROM vocab_row ORDER BY term")]

    def close(self) -> None:
        self.connection.close()


def bm25_top(indexes: dict[int, TextIndex], terms: list[str], n: int) -> tuple[list[tuple[float, int, int]], int]:
    """The ``n`` best (BM25 score, shard, row) for ``terms`` over every shard, statistics summed
    over all of them, and how many rows hold any of the terms (no other row is returned).  Ties
    go to the lower (shard, row), so the answer does not depend on the order shards are searched in.

    Terms held by more than half the rows ("the", "of") get FTS5's floor weight of 10⁻⁶: they are
    left out unless the query has no other term.  They could move a score by a few millionths, and
    reading their postings was most of a query's time (0.9 s of a 10⁵-row p50)."""
    total_rows = sum(index.rows for index in indexes.values())
    if not terms or not total_rows:
        return [], 0
    mean_length = sum(index.tokens for index in indexes.values()) / total_rows
    holding = sum(index.document_frequency(terms) for index in indexes.values())
    idf = np.log((total_rows - holding + 0.5) / (holding + 0.5))
    floored = idf <= 0
    idf[floored] = MIN_IDF
    if not floored.all():
        terms, idf = [term for term, low in zip(terms, floored) if not low], idf[~floored]
    found, holding_any = [], 0
    for shard_id, index in indexes.items():
        scores = np.zeros(len(index.lengths))
        matched = np.zeros(len(index.lengths), dtype=bool)
        for term, weight in zip(terms, idf):
            rows, counts = index.postings(term)
            norm = K1 * (1 - B + B * index.lengths[rows] / mean_length)
            scores[rows] += weight * counts * (K1 + 1) / (counts + norm)
            matched[rows] = True
        rows = np.flatnonzero(matched)
        holding_any += len(rows)
        best = rows[np.lexsort((rows, -scores[rows]))[:n]]
        found += [(float(scores[row]), shard_id, int(row)) for row in best]
    found.sort(key=lambda item: (-item[0], item[1], item[2]))
    return found[:n], holding_any

