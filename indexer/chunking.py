"""Tokenize documents and split them into training sequences of bounded length.

Each window keeps where it came from (document, token span, character span),
so a result can show its text and the exact-mode rescoring can recompute its
gradient from the stored token ids.

Character spans are cut between tokens, at the end of the token before the
cut: the whitespace a GPT-2 or SentencePiece token carries in front of a word
stays with that token, so a window's text re-tokenizes to its ids unless the
cut falls inside a word or a multi-byte character (where pieces may merge
differently, and a SentencePiece tokenizer would mark a word start), and the
non-overlapping windows of a document tile its text exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from attribdb.errors import ConfigError
from attribdb.indexer.corpus import Document, ReadReport


@dataclass(frozen=True)
class ChunkConfig:
    """How documents become training sequences (derived from the database settings)."""

    max_length: int = field(default=256, metadata={"help": "tokens per sequence"})
    stride: int | None = field(default=None, metadata={
        "help": "step between window starts; None = max_length (no overlap)"})
    min_length: int = field(default=2, metadata={
        "help": "a trailing window with fewer tokens is dropped (a causal LM needs two for one prediction)"})

    def __post_init__(self):
        if self.max_length <= 0:
            raise ConfigError(f"max-length must be positive, not {self.max_length}")
        if self.stride is not None and not 0 < self.stride <= self.max_length:
            raise ConfigError(f"stride must be between 1 and max-length ({self.max_length}), not {self.stride}")
        if not 0 < self.min_length <= self.max_length:
            raise ConfigError(f"min-length must be between 1 and max-length ({self.max_length}), not {self.min_length}")

    @property
    def step(self) -> int:
        return self.max_length if self.stride is None else self.stride


@dataclass(frozen=True)
class TextSequence:
    doc_id: str
    source: str
    token_ids: tuple[int, ...]
    token_span: tuple[int, int]  # [start, end) in the document's tokens
    char_span: tuple[int, int]  # [start, end) in the document's text
    text: str  # the document's text[char_span[0]:char_span[1]]


def chunk_documents(documents: Iterable[Document], tokenizer, config: ChunkConfig,
                    report: ReadReport | None = None) -> Iterator[TextSequence]:
    """The windows of every document, in order, one document in memory at a time.

    ``report`` should be the one :func:`attribdb.indexer.corpus.read_documents` fills: a
    document without tokens moves from its documents to its malformed records,
    and dropped short trailing windows are counted in it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chunking needs a fast (Rust-backed) tokenizer: it maps tokens back to characters")
    for document, (ids, offsets) in _encoded(documents, tokenizer):
        if not ids:
            if report is not None:
                report.reject(f"{document.source}: the text has no tokens")
            continue
        bounds = _char_bounds(offsets, len(document.text))
        for start, end in _windows(len(ids), config):
            if end - start < config.min_length:
                if report is not None:
                    report.short_windows += 1
                continue
            char_start, char_end = bounds[start], bounds[end]
            yield TextSequence(document.doc_id, document.source, tuple(ids[start:end]), (start, end),
                               (char_start, char_end), document.text[char_start:char_end])


ENCODE_BATCH = 256  # documents per tokenizer call: a call costs ~0.5 ms of Python on top of its Rust work


def _encoded(documents: Iterable, tokenizer) -> Iterator[tuple]:
    """(document, (token ids, character offsets)) in order, tokenized a few hundred documents per call."""
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            yield from zip(batch, _encode(tokenizer, [d.text for d in batch]))
            batch = []
    if batch:
        yield from zip(batch, _encode(tokenizer, [d.text for d in batch]))


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of whole documents: no special tokens, no truncation.

    ``truncation=False`` also clears a truncation a tokenizer file may carry;
    ``verbose=False`` silences the "longer than the model's maximum" warning,
    which does not apply since the document is cut into windows next.
    """
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                         truncation=False, padding=False, verbose=False)
    return list(zip(encoding["input_ids"], encoding["offset_mapping"]))


def _char_bounds(offsets: list[tuple[int, int]], n_chars: int) -> list[int]:
    """Where the text is cut before token ``i`` (``len(offsets) + 1`` positions, from 0 to ``n_chars``).

    Before token i is where token i-1 ends, so the gap between two tokens
    (whitespace that trimmed offsets leave out) goes with the token after it.
    The running maximum keeps the cuts in order for a tokenizer whose offsets
    are not (such as empty offsets for a token it added itself).
    """
    bounds = [0]
    for _, end in offsets[:-1]:
        bounds.append(max(bounds[-1], end))
    bounds.append(n_chars)
    return bounds


def _windows(n_tokens: int, config: ChunkConfig) -> Iterator[tuple[int, int]]:
    """[start, end) token spans at 0, step, 2·step, ... up to the first that reaches the end."""
    start = 0
    while True:
        end = min(start + config.max_length, n_tokens)
        yield start, end
        if end == n_tokens:
            return
        start += config.step
